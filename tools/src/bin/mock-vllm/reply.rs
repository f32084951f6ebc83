//! Writing replies: the status line, the headers every reply carries, JSON and
//! error bodies, and the date.

use crate::*;

pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) ctype: &'static str,
    /// Extra header lines, each ending in CRLF.
    pub(crate) extra: String,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn json(status: u16, v: &Value) -> Resp {
        let body = v.to_string().into_bytes();
        let ctype = "application/json";
        Resp {
            status,
            ctype,
            extra: String::new(),
            body,
        }
    }

    /// OpenAI-style error body: what vLLM returns and what clients parse.
    pub(crate) fn error(status: u16, kind: &str, msg: &str) -> Resp {
        Resp::json(
            status,
            &json!({"error": {"message": msg, "type": kind, "code": status}}),
        )
    }

    pub(crate) fn invalid(msg: &str) -> Resp {
        Resp::error(400, "invalid_request_error", msg)
    }

    pub(crate) fn not_allowed(allow: &str) -> Resp {
        let mut r = Resp::error(405, "invalid_request_error", "method not allowed");
        r.extra = format!("Allow: {allow}\r\n");
        r
    }
}

pub(crate) fn reason(status: u16) -> &'static str {
    let prefix = format!("{status} ");
    REASONS
        .split('|')
        .find_map(|r| r.strip_prefix(prefix.as_str()))
        .unwrap_or("Unknown")
}

pub(crate) fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// IMF-fixdate for the Date header (RFC 9110 5.6.7), via the days-to-civil algorithm.
pub(crate) fn http_date(secs: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: &str = "JanFebMarAprMayJunJulAugSepOctNovDec";
    let (days, t) = (secs / 86_400, secs % 86_400);
    let (era, doe) = ((days + 719_468) / 146_097, (days + 719_468) % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as usize;
    let year = yoe + era * 400 + u64::from(month <= 2);
    let (wd, mon) = (
        WEEKDAYS[(days % 7) as usize],
        &MONTHS[month * 3 - 3..month * 3],
    );
    let (h, m, s) = (t / 3600, t / 60 % 60, t % 60);
    format!("{wd}, {day:02} {mon} {year} {h:02}:{m:02}:{s:02} GMT")
}

pub(crate) struct Conn<'a> {
    pub(crate) st: &'a State,
    pub(crate) reader: BufReader<TcpStream>,
    pub(crate) out: TcpStream,
    pub(crate) close: bool,
    pub(crate) head_only: bool,
}

impl Conn<'_> {
    pub(crate) fn head(&self, status: u16, ctype: &str, framing: &str, extra: &str) -> Vec<u8> {
        let (reason, date, id) = (reason(status), http_date(now().as_secs()), &self.st.id);
        let close = if self.close {
            "Connection: close\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {status} {reason}\r\nDate: {date}\r\nContent-Type: {ctype}\r\n{framing}\r\n\
             x-mock-backend: {id}\r\n{extra}{close}\r\n"
        )
        .into_bytes()
    }

    /// The head of a 200 event stream, chunked, as vLLM sends one.
    pub(crate) fn sse_head(&self) -> Vec<u8> {
        self.head(
            200,
            "text/event-stream",
            "Transfer-Encoding: chunked",
            "Cache-Control: no-cache\r\n",
        )
    }

    /// One write per reply: with nodelay set, head and body leave in one packet.
    pub(crate) fn send(&mut self, r: &Resp) -> io::Result<()> {
        let length = format!("Content-Length: {}", r.body.len());
        let mut buf = self.head(r.status, r.ctype, &length, &r.extra);
        if !self.head_only {
            buf.extend_from_slice(&r.body);
        }
        self.out.write_all(&buf)
    }

    /// After an error reply to a request we did not fully read, closing at once
    /// could RST the connection and destroy the reply before the client reads it.
    pub(crate) fn linger(&mut self) {
        let _ = self.out.shutdown(Shutdown::Write);
        let _ = self.out.set_read_timeout(Some(Duration::from_secs(1)));
        let (mut sink, mut left) = ([0u8; 8192], 1usize << 20);
        while let Ok(n @ 1..) = self.reader.read(&mut sink) {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    }
}
