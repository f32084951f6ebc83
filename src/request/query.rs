//! The query string of a request target: the one parameter the router reads there,
//! `model`, which routes requests that carry no JSON body naming one (a WebSocket
//! upgrade, a multipart upload, a GET). A `model` in the JSON body wins.

/// The value of the first `name=` parameter in `target`'s query, percent-decoded
/// (`+` is a space, as HTML forms write it). `None` when absent or empty, or when the
/// decoded bytes are not UTF-8.
pub fn param(target: &str, name: &str) -> Option<String> {
    let (_, query) = target.split_once('?')?;
    let query = query.split('#').next().unwrap_or("");
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| decode(key).as_deref() == Some(name))
        .and_then(|(_, value)| decode(value))
        .filter(|v| !v.is_empty())
}

/// Percent-decodes one query component; a `%` not followed by two hex digits stays as
/// it is, as browsers and vLLM's framework (Starlette) leave it.
fn decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).and_then(hex),
                bytes.get(i + 2).and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::param;

    #[test]
    fn the_model_parameter_is_found_and_decoded() {
        assert_eq!(
            param("/v1/realtime?model=m1", "model").as_deref(),
            Some("m1")
        );
        assert_eq!(
            param("/x?a=1&model=org%2Fmy+lora&model=second", "model").as_deref(),
            Some("org/my lora")
        );
        assert_eq!(param("/x?modelx=1&amodel=2", "model"), None);
        assert_eq!(param("/x?model=", "model"), None);
        assert_eq!(param("/x?model", "model"), None);
        assert_eq!(param("/x", "model"), None);
        assert_eq!(param("/x?model=a%zz%4", "model").as_deref(), Some("a%zz%4"));
        assert_eq!(param("/x?model=%ff", "model"), None, "not UTF-8");
        assert_eq!(param("/x?m%6fdel=b#frag", "model").as_deref(), Some("b"));
    }
}
