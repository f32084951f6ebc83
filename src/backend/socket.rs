//! A connection to a backend that the router dials itself, outside ureq: WebSocket
//! tunnels (`request::tunnel`) need the raw socket after the upgrade, which ureq does
//! not give. Plain TCP for `http://` backends; rustls for `https://` ones in builds
//! with the `tls` feature, trusting what the backend client trusts (`tls_ca_file`,
//! else the public roots; `tls::tunnel_client_config`, read once).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use crate::control::config::Settings;

/// One backend connection of a tunnel.
pub enum Socket {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Socket {
    /// Connects to the backend at `url` (`http(s)://host[:port][/prefix]`); returns
    /// the socket and the URL's path prefix.
    pub fn connect<'u>(
        url: &'u str,
        settings: &Settings,
        timeout: Duration,
    ) -> Result<(Socket, &'u str, &'u str), String> {
        let (secure, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            _ => return Err("the backend URL is neither http:// nor https://".to_owned()),
        };
        let (authority, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let port = if secure { 443 } else { 80 };
        let tcp = dial(authority, port, timeout).map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if !secure {
            return Ok((Socket::Plain(tcp), authority, prefix));
        }
        #[cfg(feature = "tls")]
        {
            use std::sync::{Arc, OnceLock};
            // TLS files are read at start only (a reload that changes them asks for a
            // restart), so one config serves the process.
            static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
            let config = CONFIG
                .get_or_init(|| crate::tls::tunnel_client_config(settings))
                .clone()?;
            let host = host_of(authority);
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| format!("invalid server name {host:?}: {e}"))?;
            let session = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
            Ok((
                Socket::Tls(Box::new(rustls::StreamOwned::new(session, tcp))),
                authority,
                prefix,
            ))
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = settings;
            Err("https:// backends need a build with the tls feature".to_owned())
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Socket::Plain(tcp) => tcp,
            #[cfg(feature = "tls")]
            Socket::Tls(tls) => &tls.sock,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }

    /// Whether bytes already read off the socket wait to be read (TLS: records rustls
    /// decrypted and holds), which a `poll` on the socket would not tell.
    pub fn has_pending(&mut self) -> bool {
        match self {
            Socket::Plain(_) => false,
            #[cfg(feature = "tls")]
            Socket::Tls(tls) => tls
                .conn
                .process_new_packets()
                .is_ok_and(|state| state.plaintext_bytes_to_read() > 0),
        }
    }

    /// Ends the write side (after a TLS close_notify), so the backend sees the end.
    pub fn shutdown_write(&mut self) {
        #[cfg(feature = "tls")]
        if let Socket::Tls(tls) = self {
            tls.conn.send_close_notify();
            let _ = tls.conn.complete_io(&mut tls.sock);
        }
        let _ = self.tcp().shutdown(Shutdown::Write);
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Plain(tcp) => tcp.read(buf),
            #[cfg(feature = "tls")]
            Socket::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Plain(tcp) => tcp.write(buf),
            #[cfg(feature = "tls")]
            Socket::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Socket::Plain(tcp) => tcp.flush(),
            #[cfg(feature = "tls")]
            Socket::Tls(tls) => tls.flush(),
        }
    }
}

/// The host of `authority` (`host`, `host:port`, `[v6]:port`), without brackets.
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
fn host_of(authority: &str) -> &str {
    let host = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

fn dial(authority: &str, default_port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let has_port = authority
        .rfind(':')
        .is_some_and(|i| !authority[i..].contains(']'));
    let target = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host not found");
    for addr in target.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn the_host_comes_out_of_the_authority() {
        assert_eq!(host_of("gpu-1:8000"), "gpu-1");
        assert_eq!(host_of("gpu-1"), "gpu-1");
        assert_eq!(host_of("[::1]:8443"), "::1");
        assert_eq!(host_of("[::1]"), "::1");
    }
}
