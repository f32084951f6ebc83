//! WebSocket frames (RFC 6455), as far as a relay needs them: where one frame ends
//! and the next begins in a stream of bytes (`Frames`), so that the router's own close
//! frame (`close_frame`) can go in between two frames and never inside one; and the
//! client's key, which browsers send in `Sec-WebSocket-Protocol` as OpenAI's realtime
//! API has them do.
//!
//! Payloads are never looked at or held: the relay passes the bytes on as they come,
//! and an extension such as `permessage-deflate` (negotiated end to end between the
//! client and vLLM) changes only payloads.

/// The subprotocol prefix under which a browser sends its API key (OpenAI realtime).
pub const KEY_PROTOCOL: &str = "openai-insecure-api-key.";

/// Close codes the router sends (RFC 6455 section 7.4.1).
pub const GOING_AWAY: u16 = 1001;

/// Follows frame boundaries in one direction of a WebSocket.
#[derive(Debug, Default)]
pub struct Frames {
    /// The bytes of the current frame's header read so far (at most 14).
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// A close frame went by (its payload may still be coming).
    pub closed: bool,
}

impl Frames {
    /// Follows `bytes`, the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let take = (bytes.len() as u64).min(self.payload_left);
                self.payload_left -= take;
                bytes = &bytes[take as usize..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            if let Some(len) = header_done(&self.header) {
                if self.header[0] & 0x0f == 0x8 {
                    self.closed = true;
                }
                self.payload_left = len;
                self.header.clear();
            }
        }
    }

    /// Whether the bytes so far end a frame, so another may be sent now.
    pub fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.payload_left == 0
    }
}

/// The payload length, once `header` (the first bytes of a frame) is a whole header.
fn header_done(header: &[u8]) -> Option<u64> {
    if header.len() < 2 {
        return None;
    }
    let masked = header[1] & 0x80 != 0;
    let mask = if masked { 4 } else { 0 };
    let (len, ext) = match header[1] & 0x7f {
        126 => (None, 2),
        127 => (None, 8),
        n => (Some(u64::from(n)), 0),
    };
    if header.len() < 2 + ext + mask {
        return None;
    }
    Some(len.unwrap_or_else(|| {
        header[2..2 + ext]
            .iter()
            .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
    }))
}

/// A close frame with `code` and `reason` (at most 123 bytes). Frames from a client
/// to a server must be masked (`mask`: the router speaking to a backend); a server's
/// are not.
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    let reason = reason.as_bytes();
    payload.extend_from_slice(&reason[..reason.len().min(123)]);
    let mut frame = vec![0x88, payload.len() as u8];
    if let Some(key) = mask {
        frame[1] |= 0x80;
        frame.extend_from_slice(&key);
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// A masking key for the router's own frames towards a backend. RFC 6455 asks for an
/// unpredictable one so that a page's script cannot choose the bytes on the wire; the
/// router's only frame is a close it writes itself, so the clock's nanoseconds do.
pub fn mask_key() -> [u8; 4] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ 0x5bd1_e995).to_le_bytes()
}

/// The key a browser put in `Sec-WebSocket-Protocol` (`openai-insecure-api-key.KEY`),
/// and the header's other protocols, which are what goes on to the backend.
pub fn split_key_protocol(protocols: &str) -> (Option<&str>, Vec<&str>) {
    let mut key = None;
    let mut rest = Vec::new();
    for p in protocols
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match p.strip_prefix(KEY_PROTOCOL) {
            Some(k) if key.is_none() => key = Some(k),
            Some(_) => {}
            None => rest.push(p),
        }
    }
    (key, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_followed_across_any_split() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&[0x81, 0x03, b'a', b'b', b'c']); // text "abc"
        stream.extend_from_slice(&[0x82, 126, 0x01, 0x00]); // binary, 256 bytes
        stream.extend(std::iter::repeat_n(7u8, 256));
        stream.extend_from_slice(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]); // masked
        let ends = [5, 5 + 4 + 256, stream.len()];
        for split in 1..stream.len() {
            let mut frames = Frames::default();
            let mut at = 0;
            for piece in stream.chunks(split) {
                frames.feed(piece);
                at += piece.len();
                assert_eq!(
                    frames.at_boundary(),
                    ends.contains(&at),
                    "at {at}, split {split}"
                );
            }
        }
    }

    #[test]
    fn a_64_bit_length_and_a_close_are_read() {
        let mut frames = Frames::default();
        frames.feed(&[0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert!(!frames.at_boundary());
        assert_eq!(frames.payload_left, 1 << 32);
        let mut frames = Frames::default();
        frames.feed(&close_frame(GOING_AWAY, "bye", Some([9, 8, 7, 6])));
        assert!(frames.at_boundary() && frames.closed);
    }

    #[test]
    fn close_frames_carry_their_code() {
        assert_eq!(close_frame(1001, "x", None), [0x88, 3, 0x03, 0xe9, b'x']);
        let masked = close_frame(1001, "", Some([1, 1, 1, 1]));
        assert_eq!(masked, [0x88, 0x82, 1, 1, 1, 1, 0x03 ^ 1, 0xe9 ^ 1]);
        assert_eq!(close_frame(1000, &"r".repeat(200), None).len(), 2 + 125);
    }

    #[test]
    fn the_key_protocol_is_taken_out() {
        let (key, rest) =
            split_key_protocol("realtime, openai-insecure-api-key.sk-1, openai-beta.realtime-v1");
        assert_eq!(key, Some("sk-1"));
        assert_eq!(rest, ["realtime", "openai-beta.realtime-v1"]);
        assert_eq!(split_key_protocol("realtime"), (None, vec!["realtime"]));
    }
}
