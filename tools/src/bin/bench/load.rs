//! The load generator: one thread on an epoll loop over non-blocking keep-alive
//! connections, recording each request's latency and each stream's event delays.

use crate::*;

/// A place to send load to.
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) addr: SocketAddr,
    /// The proxy's processes, whose CPU time is charged to it (none for direct).
    pub(crate) proxy_pids: Vec<u32>,
    /// The mocks behind it, whose CPU time is shown beside.
    pub(crate) mock_pids: Vec<u32>,
}

impl Target {
    pub(crate) fn new(
        name: &'static str,
        addr: SocketAddr,
        proxy_pids: Vec<u32>,
        mocks: &[&Mock],
    ) -> Target {
        Target {
            name,
            addr,
            proxy_pids,
            mock_pids: mocks.iter().map(|m| m.proc.pid()).collect(),
        }
    }
}

/// What the connections of one run do.
pub(crate) enum Plan {
    /// Send again as soon as a reply is complete, until `until`; latencies count for
    /// requests sent at or after `from` and answered by `until`.
    Closed { from: Instant, until: Instant },
    /// One request per connection; whatever is not answered by `deadline` fails.
    Once { deadline: Instant },
}

/// What one run measured.
#[derive(Default)]
pub(crate) struct Record {
    pub(crate) latencies_ns: Vec<u64>,
    pub(crate) errors: Errors,
    /// Arrival minus the backend's `sent_us`, per SSE event.
    pub(crate) event_delays_us: Vec<u64>,
    /// Request sent to first SSE event, per stream.
    pub(crate) first_event_us: Vec<u64>,
    /// When each connection's (last) reply completed, by connection.
    pub(crate) done_at: Vec<Option<Instant>>,
}

#[derive(PartialEq)]
pub(crate) enum Phase {
    /// Not started yet: sends at `start` after the run begins.
    Idle,
    Waiting,
    Finished,
}

/// One client connection.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) request: usize,
    pub(crate) start: Duration,
    pub(crate) parser: Parser,
    /// The SSE scanner of the current reply, when it is an event stream.
    pub(crate) sse: Option<Sse>,
    pub(crate) sent: Instant,
    pub(crate) saw_event: bool,
    pub(crate) phase: Phase,
}

/// A single-threaded epoll loop over many keep-alive connections.
pub(crate) struct Load {
    pub(crate) addr: SocketAddr,
    pub(crate) requests: Vec<Vec<u8>>,
    pub(crate) conns: Vec<Conn>,
    pub(crate) epoll: Epoll,
    pub(crate) plan: Plan,
    pub(crate) rec: Record,
    pub(crate) began: Instant,
    /// Connections in start order whose first request is not sent yet.
    pub(crate) next_start: usize,
    pub(crate) active: usize,
}

impl Load {
    /// Opens one connection per `(request index, start offset)`, in start order.
    pub(crate) fn connect(
        addr: SocketAddr,
        requests: Vec<Vec<u8>>,
        starts: Vec<(usize, Duration)>,
        plan: Plan,
    ) -> Result<Load, String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll_create1: {e}"))?;
        let mut conns = Vec::with_capacity(starts.len());
        for (i, (request, start)) in starts.into_iter().enumerate() {
            let stream = open(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            epoll
                .add(stream.as_raw_fd(), i as u64)
                .map_err(|e| format!("epoll_ctl: {e}"))?;
            conns.push(Conn {
                stream,
                request,
                start,
                parser: Parser::default(),
                sse: None,
                sent: Instant::now(),
                saw_event: false,
                phase: Phase::Idle,
            });
        }
        let n = conns.len();
        Ok(Load {
            addr,
            requests,
            conns,
            epoll,
            plan,
            rec: Record {
                done_at: vec![None; n],
                ..Record::default()
            },
            began: Instant::now(),
            next_start: 0,
            active: n,
        })
    }

    pub(crate) fn run(mut self) -> Result<Record, String> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        let mut buf = vec![0u8; 64 * 1024];
        self.began = Instant::now();
        while self.active > 0 {
            self.start_due();
            let n = self
                .epoll
                .wait(&mut events, self.wait_timeout())
                .map_err(|e| format!("epoll_wait: {e}"))?;
            for ev in &events[..n] {
                let key = ev.u64 as usize;
                self.readable(key, &mut buf);
            }
            self.give_up_if_stuck();
        }
        Ok(self.rec)
    }

    /// Sends the first request of every connection whose start time has come.
    pub(crate) fn start_due(&mut self) {
        let elapsed = self.began.elapsed();
        while self.next_start < self.conns.len() && self.conns[self.next_start].start <= elapsed {
            let i = self.next_start;
            self.next_start += 1;
            self.send(i);
        }
    }

    pub(crate) fn wait_timeout(&self) -> Duration {
        let next = self.conns.get(self.next_start).map(|c| c.start);
        next.map_or(Duration::from_millis(50), |s| {
            s.saturating_sub(self.began.elapsed())
        })
    }

    pub(crate) fn send(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.sent = Instant::now();
        c.phase = Phase::Waiting;
        c.saw_event = false;
        // A small request on an idle socket never fills the send buffer, so a
        // non-blocking write that does not take it all is a failure like any other.
        if let Err(e) = c.stream.write_all(&self.requests[c.request]) {
            self.failed(i, &format!("write: {}", e.kind()));
        }
    }

    pub(crate) fn readable(&mut self, i: usize, buf: &mut [u8]) {
        let c = &mut self.conns[i];
        if c.phase == Phase::Finished {
            return;
        }
        let n = match c.stream.read(buf) {
            Ok(0) => return self.failed(i, "closed by the server"),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return
            }
            Err(e) => return self.failed(i, &format!("read: {}", e.kind())),
        };
        let arrival = unix_us();
        c.parser.extend(&buf[..n]);
        match drain_steps(c, &mut self.rec, arrival) {
            Ok(Some(status)) => self.completed(i, status),
            Ok(None) => {}
            Err(e) => self.failed(i, &format!("bad reply: {e}")),
        }
    }

    pub(crate) fn completed(&mut self, i: usize, status: u16) {
        let now = Instant::now();
        self.rec.done_at[i] = Some(now);
        if status != 200 {
            self.rec.errors.add(&format!("status {status}"));
        }
        match self.plan {
            Plan::Closed { from, until } => {
                let sent = self.conns[i].sent;
                if status == 200 && sent >= from && now <= until {
                    self.rec.latencies_ns.push((now - sent).as_nanos() as u64);
                }
                if now < until {
                    self.send(i);
                } else {
                    self.finish(i);
                }
            }
            Plan::Once { .. } => self.finish(i),
        }
    }

    /// Counts a failure; in a closed loop the connection is opened again and goes on.
    pub(crate) fn failed(&mut self, i: usize, why: &str) {
        if self.conns[i].phase == Phase::Finished {
            return;
        }
        self.rec.errors.add(why);
        let retry = matches!(self.plan, Plan::Closed { until, .. } if Instant::now() < until);
        if !retry || self.reconnect(i).is_err() {
            return self.finish(i);
        }
        self.send(i);
    }

    pub(crate) fn reconnect(&mut self, i: usize) -> io::Result<()> {
        let stream = open(self.addr)?;
        self.epoll.add(stream.as_raw_fd(), i as u64)?;
        let c = &mut self.conns[i];
        c.stream = stream;
        c.parser = Parser::default();
        c.sse = None;
        Ok(())
    }

    pub(crate) fn finish(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.phase != Phase::Finished {
            c.phase = Phase::Finished;
            let _ = self.epoll.delete(c.stream.as_raw_fd());
            self.active -= 1;
        }
    }

    /// A run that cannot end (a reply that never comes) ends here, its stragglers failed.
    pub(crate) fn give_up_if_stuck(&mut self) {
        let deadline = match self.plan {
            Plan::Closed { until, .. } => until + GRACE,
            Plan::Once { deadline } => deadline,
        };
        if Instant::now() < deadline {
            return;
        }
        for i in 0..self.conns.len() {
            if self.conns[i].phase != Phase::Finished {
                self.rec.errors.add("no reply in time");
                self.finish(i);
            }
        }
    }
}

/// Works through what the parser holds: the events of an event stream are recorded,
/// and a complete reply returns its status.
pub(crate) fn drain_steps(
    c: &mut Conn,
    rec: &mut Record,
    arrival_us: u64,
) -> Result<Option<u16>, String> {
    loop {
        let sse = match c.parser.next()? {
            Step::NeedMore => return Ok(None),
            Step::Head { event_stream } => {
                c.sse = event_stream.then(Sse::default);
                continue;
            }
            Step::Done(status) => return Ok(Some(status)),
            Step::Data(data) => match c.sse.as_mut() {
                Some(sse) => sse.feed(data),
                None => continue,
            },
        };
        for sent_us in sse {
            rec.event_delays_us.push(arrival_us.saturating_sub(sent_us));
            if !c.saw_event {
                c.saw_event = true;
                rec.first_event_us.push(c.sent.elapsed().as_micros() as u64);
            }
        }
    }
}

pub(crate) fn open(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// A POST with a JSON body and extra headers, ready to write.
pub(crate) fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req += &format!("{name}: {value}\r\n");
    }
    req += "\r\n";
    req += body;
    req.into_bytes()
}

/// The few epoll calls the load generator needs, level-triggered on readability.
pub(crate) struct Epoll {
    pub(crate) fd: OwnedFd,
}

// The only unsafe code of the benchmark: three libc calls, each given valid pointers.
#[allow(unsafe_code)]
impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; a non-negative result is a new fd that we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub(crate) fn ctl(&self, op: libc::c_int, fd: RawFd, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: key,
        };
        // SAFETY: both fds are open and `ev` is a live epoll_event for the call.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn add(&self, fd: RawFd, key: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, key)
    }

    pub(crate) fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0)
    }

    pub(crate) fn wait(
        &self,
        events: &mut [libc::epoll_event],
        timeout: Duration,
    ) -> io::Result<usize> {
        let ms = timeout.as_millis().min(1000) as libc::c_int;
        let max = events.len().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: `events` is valid for writes of `max` entries.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, ms) };
        match n {
            n if n >= 0 => Ok(n as usize),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    Ok(0)
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit: 1000 streams need 1000
/// client sockets here, and the router and nginx (which inherit it) twice that.
#[allow(unsafe_code)]
pub(crate) fn raise_fd_limit() -> Result<(), String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live rlimit for both calls.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()));
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if rc != 0 || lim.rlim_cur < 4096 {
        return Err(format!(
            "need at least 4096 open files, the hard limit is {} (raise it with ulimit -Hn)",
            lim.rlim_max
        ));
    }
    Ok(())
}
