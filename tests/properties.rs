//! Property tests of the parsing front: whatever bytes arrive, the config parser, the
//! framing checks, the model lookup and the key check return a value (never panic),
//! and config errors stay one located line. Each property runs 1000 random cases in
//! `make test`; a failure prints the shrunk input to add as a regular test.

use std::path::Path;

use proptest::prelude::*;
use vllm_router::{auth, config, headers, relay};

const GUIDE: &str = include_str!("fixtures/guide-production.toml");

/// An edit of a config text: (position, what to do, a character).
fn edits() -> impl Strategy<Value = Vec<(usize, u8, char)>> {
    prop::collection::vec((0usize..2000, 0u8..3, any::<char>()), 1..8)
}

fn apply(text: &str, edits: &[(usize, u8, char)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for &(at, op, c) in edits {
        let at = at % (chars.len() + 1);
        match op {
            0 => chars.insert(at, c),
            1 if at < chars.len() => {
                chars.remove(at);
            }
            _ if at < chars.len() => chars[at] = c,
            _ => chars.push(c),
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_config_parser_takes_any_text(text in "\\PC{0,300}") {
        let _ = config::parse(&text, Path::new("fuzz.toml"));
    }

    #[test]
    fn a_damaged_config_gives_one_located_line(edits in edits()) {
        let text = apply(GUIDE, &edits);
        if let Err(e) = config::parse(&text, Path::new("fuzz.toml")) {
            let line = e.to_string();
            prop_assert!(line.starts_with("fuzz.toml"), "{line}");
            prop_assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn framing_checks_take_any_headers(
        list in prop::collection::vec(("(?i)content-length|transfer-encoding|x-[a-z]{1,5}", "\\PC{0,24}"), 0..6)
    ) {
        let _ = headers::declared_length(&list);
        let _ = headers::upstream_headers(&list);
        let _ = headers::downstream_headers(&list);
        let _ = headers::head_within_caps(&list);
    }

    #[test]
    fn the_model_lookup_takes_any_body(body in prop::collection::vec(any::<u8>(), 0..256), json in any::<bool>()) {
        let body = if json { [b"{\"model\":".as_slice(), &body, b"}"].concat() } else { body };
        for target in ["/v1/chat/completions", "/v1/other?x=1"] {
            let _ = relay::requested_model("POST", target, &body);
        }
    }

    #[test]
    fn the_key_check_takes_any_header(header in prop::option::of("\\PC{0,64}")) {
        let keys = [auth::Secret::new("sk-1")];
        let ok = auth::authorized(header.as_deref(), keys.iter());
        let expected = header.as_deref().is_some_and(|h| {
            let h = h.trim();
            h.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                && h.get(7..).is_some_and(|token| token.trim() == "sk-1")
        });
        prop_assert_eq!(ok, expected);
    }
}
