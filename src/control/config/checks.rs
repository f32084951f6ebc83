//! The checks: the rule for each kind of value a key takes (`Val`), and the rules between
//! keys (`cross_field`), each with the message that says how to fix the value.

use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;
use toml::de::{DeInteger, DeTable, DeValue};
use toml::Spanned;

use super::error::{bad, quote, Bad};
use super::url::normalise_url;
use super::Settings;
use crate::request::auth::Secret;

/// Longest accepted duration: anything longer is a mistake, and it keeps `Instant + d` from
/// overflowing in the code that uses these values.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;
pub(super) const MAX_CAPACITY: u64 = 100_000;
pub(super) const ZERO_OK: bool = true;
pub(super) const POSITIVE: bool = false;

/// Case-insensitive `error`, `warn` (or `warning`), `info`, `debug` or `trace`.
pub fn parse_log_level(s: &str) -> Option<LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Some(LevelFilter::Error),
        // `warning` is what users of the Python router have in LOG_LEVEL.
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// A value under validation, with what is needed to complain about it.
pub(super) struct Val<'a> {
    name: &'static str,
    pub(super) value: &'a DeValue<'a>,
    pub(super) span: Range<usize>,
    pub(super) text: &'a str,
}

impl<'a> Val<'a> {
    pub(super) fn new(name: &'static str, value: &'a Spanned<DeValue<'a>>, text: &'a str) -> Self {
        let span = value.span();
        Val {
            name,
            value: value.get_ref(),
            span,
            text,
        }
    }

    pub(super) fn wrong_type<T>(&self, what: &str) -> Result<T, Bad> {
        let found = match self.value {
            DeValue::String(s) => format!("string {}", quote(s)),
            DeValue::Array(_) => "an array".to_string(),
            DeValue::Table(_) => "a table".to_string(),
            other => format!("{} {}", other.type_str(), self.raw()),
        };
        let msg = format!("{} must be {what}, found {found}", self.name);
        Err(bad(self.span.clone(), msg))
    }

    fn out_of_range<T>(&self, rule: &str) -> Result<T, Bad> {
        let msg = format!("{} must be {rule}, found {}", self.name, self.raw());
        Err(bad(self.span.clone(), msg))
    }

    /// The value as written, so messages quote exactly what the user typed.
    fn raw(&self) -> &str {
        self.text.get(self.span.clone()).unwrap_or_default()
    }

    pub(super) fn table(&self, what: &str) -> Result<&'a DeTable<'a>, Bad> {
        match self.value {
            DeValue::Table(table) => Ok(table),
            _ => self.wrong_type(what),
        }
    }

    fn number(&self, what: &str) -> Result<f64, Bad> {
        let n = match self.value {
            DeValue::Integer(i) => Some(integer(i) as f64),
            DeValue::Float(f) => f.as_str().parse().ok(),
            _ => None,
        };
        n.map_or_else(|| self.wrong_type(what), Ok)
    }

    pub(super) fn secs(&self, zero_ok: bool) -> Result<Duration, Bad> {
        let n = self.number("a number of seconds")?;
        if n > MAX_SECS && n.is_finite() {
            return self.out_of_range(&format!("at most {MAX_SECS} seconds (a year)"));
        }
        match Duration::try_from_secs_f64(n) {
            Ok(d) if zero_ok || !d.is_zero() => Ok(d),
            _ if zero_ok => self.out_of_range("zero or more seconds"),
            _ => self.out_of_range("more than 0 seconds"),
        }
    }

    pub(super) fn int(&self, min: u64, max: u64) -> Result<u64, Bad> {
        let DeValue::Integer(i) = self.value else {
            return self.wrong_type("a whole number");
        };
        match integer(i) {
            n if n < i128::from(min) => self.out_of_range(&format!("at least {min}")),
            n if n <= i128::from(max) => Ok(n as u64),
            _ => self.out_of_range(&format!("at most {max}")),
        }
    }

    pub(super) fn rate(&self) -> Result<f64, Bad> {
        match self.number("a number between 0 and 1")? {
            n if (0.0..=1.0).contains(&n) => Ok(n),
            _ => self.out_of_range("between 0 and 1"),
        }
    }

    pub(super) fn boolean(&self) -> Result<bool, Bad> {
        self.value
            .as_bool()
            .map_or_else(|| self.wrong_type("true or false"), Ok)
    }

    /// A key. Messages never quote a string value here: it may be the key itself.
    pub(super) fn secret(&self) -> Result<Secret, Bad> {
        match self.value.as_str() {
            Some(key) if crate::request::auth::valid_key(key) => Ok(Secret::new(key)),
            Some(_) => Err(bad(
                self.span.clone(),
                format!(
                    "{} must be a non-empty key without spaces or control characters",
                    self.name
                ),
            )),
            None if matches!(self.value, DeValue::Array(_) | DeValue::Table(_)) => {
                self.wrong_type("a string")
            }
            None => Err(bad(
                self.span.clone(),
                format!("{} must be a string", self.name),
            )),
        }
    }

    pub(super) fn secret_list(&self) -> Result<Vec<Secret>, Bad> {
        let DeValue::Array(items) = self.value else {
            return Err(bad(
                self.span.clone(),
                format!(
                    "{} must be an array of strings, like [\"key-1\", \"key-2\"]",
                    self.name
                ),
            ));
        };
        items
            .iter()
            .map(|item| Val::new(self.name, item, self.text).secret())
            .collect()
    }

    pub(super) fn path(&self) -> Result<PathBuf, Bad> {
        match self.value.as_str() {
            Some(p) if !p.trim().is_empty() => Ok(PathBuf::from(p)),
            _ => self.wrong_type("a file path"),
        }
    }

    pub(super) fn host(&self) -> Result<String, Bad> {
        match self.value.as_str() {
            Some(h) if valid_host(h) => Ok(h.to_string()),
            _ => self.wrong_type("an IP address or hostname such as \"0.0.0.0\""),
        }
    }

    /// One of `names`, as its index.
    pub(super) fn one_of(&self, names: &[&str]) -> Result<usize, Bad> {
        let found = self
            .value
            .as_str()
            .and_then(|v| names.iter().position(|n| *n == v));
        let what = names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(" or ");
        found.map_or_else(|| self.wrong_type(&what), Ok)
    }

    /// An HTTP header name (an RFC 9110 token), lower-cased.
    pub(super) fn header_name(&self) -> Result<String, Bad> {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        match self.value.as_str() {
            Some(h) if !h.is_empty() && h.len() <= 128 && h.bytes().all(token) => {
                Ok(h.to_ascii_lowercase())
            }
            _ => self.wrong_type("a header name such as \"X-Session-ID\""),
        }
    }

    pub(super) fn log_level(&self) -> Result<LevelFilter, Bad> {
        let what = "one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"";
        let level = self.value.as_str().and_then(parse_log_level);
        level.map_or_else(|| self.wrong_type(what), Ok)
    }

    pub(super) fn url(&self) -> Result<String, Bad> {
        let Some(url) = self.value.as_str() else {
            return self.wrong_type("a string like \"http://host:8000\"");
        };
        normalise_url(url).map_err(|msg| bad(self.span.clone(), msg))
    }
}

/// The value of a TOML integer; one too long for i128 saturates, which every range check rejects.
fn integer(i: &DeInteger) -> i128 {
    let saturated = if i.as_str().starts_with('-') {
        i128::MIN
    } else {
        i128::MAX
    };
    i128::from_str_radix(i.as_str(), i.radix()).unwrap_or(saturated)
}

/// An IP address or an RFC 1123 hostname (underscores allowed: Docker service names use them).
pub fn valid_host(host: &str) -> bool {
    if host.parse::<IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    // An all-digit last label would be a mistyped IPv4 address, not a name.
    let last_ok = name
        .rsplit('.')
        .next()
        .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()));
    name.len() <= 253 && name.split('.').all(label_ok) && last_ok
}

/// The keys of an `api_keys_file` whose text is `text`; `path` names it in messages.
pub(super) fn key_file_keys(text: &str, path: &Path) -> Result<Vec<Secret>, String> {
    let keys = crate::request::auth::parse_key_file(text).map_err(|line| {
        format!(
            "api_keys_file {} line {line} is not a valid key (no spaces or control characters)",
            path.display()
        )
    })?;
    // An empty file would open the router to everyone, for instance while a key
    // rotation rewrites it: refused, so a reload keeps the keys in force.
    if keys.is_empty() {
        return Err(format!(
            "api_keys_file {} holds no keys; add a key or remove api_keys_file",
            path.display()
        ));
    }
    Ok(keys)
}

/// The rules between keys, once every key has its value; `base` is the config file's
/// directory.
pub(super) fn cross_field(settings: &mut Settings, base: &Path) -> Result<(), Bad> {
    check_tls(settings, base)?;
    if settings.max_buffered_body_bytes < settings.max_body_bytes {
        let msg = format!(
            "max_buffered_body_bytes ({}) must be at least max_body_bytes ({}): a body of the largest allowed size must fit",
            settings.max_buffered_body_bytes, settings.max_body_bytes
        );
        return Err(Bad(None, msg));
    }
    Ok(())
}

/// TLS files are read relative to the config file; certificate and key go together;
/// a build without the `tls` feature refuses them rather than serving plain HTTP.
fn check_tls(settings: &mut Settings, base: &Path) -> Result<(), Bad> {
    for file in [
        &mut settings.tls_cert_file,
        &mut settings.tls_key_file,
        &mut settings.tls_ca_file,
    ] {
        if let Some(path) = file.take() {
            *file = Some(base.join(path));
        }
    }
    if settings.tls_cert_file.is_some() != settings.tls_key_file.is_some() {
        let msg = "set both tls_cert_file and tls_key_file to serve HTTPS, or neither";
        return Err(Bad(None, msg.to_string()));
    }
    let uses_tls = settings.tls_cert_file.is_some() || settings.tls_ca_file.is_some();
    if uses_tls && !cfg!(feature = "tls") {
        let msg = "tls_cert_file, tls_key_file and tls_ca_file need a build with TLS: \
                   `cargo build --release --features tls` (or `make build FEATURES=tls`)";
        return Err(Bad(None, msg.to_string()));
    }
    Ok(())
}
