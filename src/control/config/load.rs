//! The only file reading of the config: `servers.toml` itself, then the `api_keys_file` it
//! names. Everything between is the pure `parse`.

use std::path::Path;

use super::checks::key_file_keys;
use super::error::{position, ConfigError};
use super::parse::{parse_document, KeyFile, Parsed};
use super::Config;
use crate::request::auth::Secret;

/// Reads and validates the file at `path`, and the key file it names.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    from_bytes(&read(path)?, path)
}

/// Reads the config file's bytes, with an error that says how to fix a missing file.
pub fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::new(path, None, read_failure(&e)))
}

/// Validates a config file's bytes already read (UTF-8, then `parse`), then reads the key
/// file it names; `path` names it in messages and is where relative paths start.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Config, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let valid = e.valid_up_to();
        let prefix = String::from_utf8_lossy(bytes.get(..valid).unwrap_or_default());
        let at = Some(position(&prefix, valid));
        ConfigError::new(path, at, "config file is not valid UTF-8; save it as UTF-8")
    })?;
    let Parsed { result, key_file } = parse_document(text, path);
    // The key file was named before the file's first problem, if any: its own problem
    // comes first.
    let file_api_keys = key_file
        .map(|file| read_key_file(&file, path))
        .transpose()?;
    let mut config = result?;
    if let Some(keys) = file_api_keys {
        config.settings.file_api_keys = keys;
    }
    Ok(config)
}

/// Reads an `api_keys_file`; errors point at the `api_keys_file` value in `config_path`.
fn read_key_file(file: &KeyFile, config_path: &Path) -> Result<Vec<Secret>, ConfigError> {
    let fail = |msg: String| ConfigError::new(config_path, Some(file.location), msg);
    let text = std::fs::read_to_string(&file.path).map_err(|e| {
        fail(format!(
            "cannot read api_keys_file {}: {e}",
            file.path.display()
        ))
    })?;
    key_file_keys(&text, &file.path).map_err(fail)
}

fn read_failure(e: &std::io::Error) -> String {
    let hint = match e.kind() {
        std::io::ErrorKind::NotFound => "; set --config or CONFIG_PATH to the servers.toml to use",
        std::io::ErrorKind::PermissionDenied => "; make it readable by the user running the router",
        std::io::ErrorKind::IsADirectory => "; point --config or CONFIG_PATH at a file",
        _ => "",
    };
    format!("cannot read config file: {e}{hint}")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::control::config::parse;

    /// A fresh directory under the system's temp directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("vllm-router-config-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const ONE_SERVER: &str =
        "[servers]\nservers = [{ url = \"http://a:8081\", max_concurrent_requests = 2 }]\n";

    #[test]
    fn load_reports_missing_and_non_utf8_files() {
        let missing = Path::new("/nonexistent/servers.toml");
        let e = load(missing).expect_err("missing file");
        assert_eq!(e.to_string(), "/nonexistent/servers.toml: cannot read config file: No such file or directory (os error 2); set --config or CONFIG_PATH to the servers.toml to use");
        let dir = TempDir::new("utf8");
        let path = dir.0.join("servers.toml");
        std::fs::write(&path, b"[config]\nhost = \"\xff\"\n").expect("write temp file");
        let e = load(&path).expect_err("bad utf-8");
        let expected = "2:9: config file is not valid UTF-8; save it as UTF-8";
        assert_eq!(e.to_string(), format!("{}:{expected}", path.display()));
    }

    #[test]
    fn key_files_are_read_by_load_not_by_parse() {
        let dir = TempDir::new("keys");
        let path = dir.0.join("servers.toml");
        let text = format!("{ONE_SERVER}[config]\napi_keys_file = \"keys.txt\"\n");
        std::fs::write(&path, &text).expect("write config");
        let e = load(&path).expect_err("no key file yet");
        let expected = format!(
            "{}:4:17: cannot read api_keys_file {}: No such file or directory (os error 2)",
            path.display(),
            dir.0.join("keys.txt").display()
        );
        assert_eq!(e.to_string(), expected);
        let pure = parse(&text, &path).expect("parse reads no file");
        assert!(pure.settings.file_api_keys.is_empty());

        std::fs::write(dir.0.join("keys.txt"), "# comment\nkey-1\n\nkey-2\n").expect("keys");
        let config = load(&path).expect("valid");
        assert_eq!(
            config.settings.file_api_keys,
            [Secret::new("key-1"), Secret::new("key-2")]
        );

        std::fs::write(dir.0.join("keys.txt"), "# none\n").expect("keys");
        let e = load(&path).expect_err("empty key file");
        let keys = dir.0.join("keys.txt");
        let expected = format!(
            "{}:4:17: api_keys_file {} holds no keys; add a key or remove api_keys_file",
            path.display(),
            keys.display()
        );
        assert_eq!(e.to_string(), expected);
        std::fs::write(&keys, "good\nbad key\n").expect("keys");
        let e = load(&path).expect_err("bad key line");
        let expected = format!(
            "{}:4:17: api_keys_file {} line 2 is not a valid key (no spaces or control characters)",
            path.display(),
            keys.display()
        );
        assert_eq!(e.to_string(), expected);
    }

    #[test]
    fn a_key_file_problem_comes_before_later_problems_only() {
        let dir = TempDir::new("order");
        let path = dir.0.join("servers.toml");
        let missing = dir.0.join("missing.txt");
        let later =
            format!("{ONE_SERVER}[config]\napi_keys_file = \"missing.txt\"\nmax_retries = -1\n");
        std::fs::write(&path, &later).expect("write config");
        let e = load(&path).expect_err("missing key file");
        let expected = format!(
            "{}:4:17: cannot read api_keys_file {}: No such file or directory (os error 2)",
            path.display(),
            missing.display()
        );
        assert_eq!(e.to_string(), expected);
        // A cross-field problem is found after every key: the key file still comes first.
        let cross = format!(
            "{ONE_SERVER}[config]\napi_keys_file = \"missing.txt\"\nmax_body_bytes = 10\nmax_buffered_body_bytes = 5\n"
        );
        std::fs::write(&path, &cross).expect("write config");
        assert_eq!(load(&path).expect_err("missing").to_string(), expected);
        let earlier =
            format!("{ONE_SERVER}[config]\nmax_retries = -1\napi_keys_file = \"missing.txt\"\n");
        std::fs::write(&path, &earlier).expect("write config");
        let e = load(&path).expect_err("bad max_retries");
        let expected = format!(
            "{}:4:15: max_retries must be at least 0, found -1",
            path.display()
        );
        assert_eq!(e.to_string(), expected);
    }
}
