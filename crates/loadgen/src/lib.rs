//! `pykp-loadgen`: the load generator of `pykp bench` (std + libc, epoll, no async runtime).
//!
//! A library so that the Python extension carries it (`pykp._fastpath.loadgen_main`, the
//! wheel's `pykp-loadgen` command): a user of the wheel has no cargo. `src/main.rs` is the
//! same program as a plain binary for the checkout.
//!
//! Three modes, each bounded in time and count:
//!
//! * `serve --port P|A-B --name NAME [--threads T]`: a backend (one listener per port).
//!   Reads one small request
//!   (up to the blank line), answers `HTTP/1.0 200` with NAME as the body and closes
//!   first, so TIME_WAIT stays on the server and the client's ports are free at once.
//! * `conns --target IP:PORT... [--pick random|rr] [--concurrency C] [--rate R]
//!   [--duration S] [--max-conns N] [--threads T]`: new connections (connect, one
//!   request, read the answer to EOF, close). Closed loop with C in flight when R is 0,
//!   else open loop at R connections/s (at most C in flight). Prints one JSON object:
//!   counts, errors by kind, connect and total latency percentiles, answers by backend.
//! * `probe --target IP:PORT --expect NAME[,NAME] [--timeout S] [--interval-us U]`:
//!   one connection at a time until the answer is one of the expected names; prints
//!   "ready" after its first attempt, then the CLOCK_MONOTONIC time of that answer.
//!   `pykp bench` times a change from a monotonic instant taken just before it.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n";
const MAX_EVENTS: usize = 256;

/// Runs `pykp-loadgen ARGS...` (the arguments after the program name) to completion.
/// Bad arguments print the usage and exit the process with 2, as the binary does.
pub fn run(args: &[String]) {
    let Some((mode, rest)) = args.split_first() else {
        usage("a mode is required");
    };
    let opts = Opts::parse(rest);
    match mode.as_str() {
        "serve" => serve(&opts),
        "conns" => conns(&opts),
        "probe" => probe(&opts),
        other => usage(&format!("unknown mode {other:?}")),
    }
}

fn usage(message: &str) -> ! {
    eprintln!("pykp-loadgen: {message}");
    eprintln!("usage: pykp-loadgen serve --port P|A-B --name NAME [--threads T]");
    eprintln!(
        "       pykp-loadgen conns --target IP:PORT [--target ...] [--pick random|rr] \
         [--concurrency C] [--rate R] [--duration S] [--max-conns N] [--threads T] \
         [--timeout-ms MS]"
    );
    eprintln!(
        "       pykp-loadgen probe --target IP:PORT --expect NAME[,NAME] [--timeout S] \
         [--interval-us U] [--connect-timeout-ms MS]"
    );
    std::process::exit(2);
}

// --- options -------------------------------------------------------------------------

struct Opts {
    values: HashMap<String, Vec<String>>,
}

impl Opts {
    fn parse(args: &[String]) -> Self {
        let mut values: HashMap<String, Vec<String>> = HashMap::new();
        let mut it = args.iter();
        while let Some(key) = it.next() {
            let Some(name) = key.strip_prefix("--") else {
                usage(&format!("unexpected argument {key:?}"));
            };
            let Some(value) = it.next() else {
                usage(&format!("--{name} needs a value"));
            };
            values.entry(name.to_string()).or_default().push(value.clone());
        }
        Opts { values }
    }

    fn str(&self, name: &str) -> Option<&str> {
        self.values.get(name).and_then(|v| v.last()).map(String::as_str)
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.values.get(name).cloned().unwrap_or_default()
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.str(name) {
            None => default,
            Some(text) => text
                .parse()
                .unwrap_or_else(|_| usage(&format!("--{name}: {text:?} is not a number"))),
        }
    }
}

fn targets(opts: &Opts) -> Vec<libc::sockaddr_in> {
    let mut out = Vec::new();
    for text in opts.all("target") {
        for item in text.split(',').filter(|s| !s.is_empty()) {
            let addr: SocketAddrV4 =
                item.parse().unwrap_or_else(|_| usage(&format!("{item:?} is not IPv4:port")));
            out.push(sockaddr(addr));
        }
    }
    if let Some(path) = opts.str("targets-file") {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| usage(&format!("cannot read {path}: {e}")));
        for line in text.split_whitespace() {
            let addr: SocketAddrV4 =
                line.parse().unwrap_or_else(|_| usage(&format!("{line:?} is not IPv4:port")));
            out.push(sockaddr(addr));
        }
    }
    if out.is_empty() {
        usage("at least one --target is required");
    }
    out
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

// --- thin libc wrappers ----------------------------------------------------------------

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn check(ret: libc::c_int, what: &str) -> libc::c_int {
    if ret < 0 {
        eprintln!("pykp-loadgen: {what}: {}", io::Error::last_os_error());
        std::process::exit(1);
    }
    ret
}

struct Epoll(libc::c_int);

impl Epoll {
    fn new() -> Self {
        // SAFETY: plain syscall.
        Epoll(check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) }, "epoll_create1"))
    }

    fn ctl(&self, op: libc::c_int, fd: libc::c_int, events: u32, token: u64) {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` outlives the call.
        unsafe { libc::epoll_ctl(self.0, op, fd, &mut ev) };
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        // SAFETY: the buffer is valid for `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, timeout_ms)
        };
        if n < 0 {
            if errno() == libc::EINTR {
                return 0;
            }
            check(n, "epoll_wait");
        }
        n as usize
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn close(fd: libc::c_int) {
    // SAFETY: the caller owns `fd` and forgets it afterwards.
    unsafe { libc::close(fd) };
}

fn read(fd: libc::c_int, buf: &mut [u8]) -> isize {
    // SAFETY: the buffer is valid for its length.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
}

fn write(fd: libc::c_int, buf: &[u8]) -> isize {
    // SAFETY: the buffer is valid for its length.
    unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }
}

fn setsockopt_int(fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: the option value is a valid c_int for the call.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn monotonic() -> f64 {
    // SAFETY: `ts` is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

// --- serve -----------------------------------------------------------------------------

/// `--port 8080` or a range `10000-19999`: one listening socket per port.
fn ports(opts: &Opts) -> Vec<u16> {
    let text = opts.str("port").unwrap_or("8080");
    let bad = || usage(&format!("--port: {text:?} is not a port or a range A-B"));
    match text.split_once('-') {
        None => vec![text.parse().unwrap_or_else(|_| bad())],
        Some((a, b)) => {
            let (a, b): (u16, u16) =
                (a.parse().unwrap_or_else(|_| bad()), b.parse().unwrap_or_else(|_| bad()));
            if a > b {
                bad();
            }
            (a..=b).collect()
        }
    }
}

/// Raise the soft descriptor limit to the hard one (a listener per port adds up).
fn raise_nofile() {
    // SAFETY: valid out/in parameters for getrlimit/setrlimit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn serve(opts: &Opts) {
    let ports = ports(opts);
    raise_nofile();
    let name = opts.str("name").unwrap_or("backend").to_string();
    let threads: usize = opts.num("threads", 1).max(1);
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}\n",
        name.len() + 1,
        name
    )
    .into_bytes();
    let listeners: Vec<Vec<libc::c_int>> =
        (0..threads).map(|_| ports.iter().map(|&port| listen_socket(port)).collect()).collect();
    println!("ready");
    io::stdout().flush().ok();
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|fds| {
            let response = response.clone();
            std::thread::spawn(move || serve_loop(&fds, &response))
        })
        .collect();
    for handle in handles {
        handle.join().ok();
    }
}

fn listen_socket(port: u16) -> libc::c_int {
    // SAFETY: plain syscalls on a descriptor we own.
    unsafe {
        let fd = check(
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            ),
            "socket",
        );
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1);
        let sa = sockaddr(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port));
        check(
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ),
            "bind",
        );
        check(libc::listen(fd, 4096), "listen");
        fd
    }
}

fn serve_loop(listeners: &[libc::c_int], response: &[u8]) {
    // Listener tokens carry this bit; connection tokens are the bare descriptor.
    const LISTENER: u64 = 1 << 63;
    let ep = Epoll::new();
    for &fd in listeners {
        ep.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, LISTENER | fd as u64);
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    let mut partial: HashMap<libc::c_int, Vec<u8>> = HashMap::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = ep.wait(&mut events, -1);
        for ev in &events[..n] {
            let token = ev.u64;
            if token & LISTENER != 0 {
                let listener = (token & !LISTENER) as libc::c_int;
                loop {
                    // SAFETY: accept4 with null address pointers is allowed.
                    let fd = unsafe {
                        libc::accept4(
                            listener,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                        )
                    };
                    if fd < 0 {
                        break;
                    }
                    ep.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, fd as u64);
                }
                continue;
            }
            let fd = token as libc::c_int;
            let got = read(fd, &mut buf);
            if got < 0 && errno() == libc::EAGAIN {
                continue;
            }
            if got <= 0 {
                partial.remove(&fd);
                close(fd);
                continue;
            }
            let chunk = &buf[..got as usize];
            let complete = match partial.get_mut(&fd) {
                Some(acc) => {
                    acc.extend_from_slice(chunk);
                    ends_request(acc) || acc.len() > 16384
                }
                None if ends_request(chunk) => true,
                None => {
                    partial.insert(fd, chunk.to_vec());
                    false
                }
            };
            if complete {
                partial.remove(&fd);
                // The answer is far below the socket buffer: one write sends it all.
                write(fd, response);
                close(fd); // the server closes first, HTTP/1.0 style
            }
        }
    }
}

fn ends_request(data: &[u8]) -> bool {
    data.windows(4).any(|w| w == b"\r\n\r\n")
}

// --- conns -----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Connecting,
    Reading,
}

struct Conn {
    fd: libc::c_int,
    slot: u64,
    phase: Phase,
    started: Instant,
    connected_us: u32,
    len: usize,
    buf: [u8; 192],
}

#[derive(Default)]
struct Tally {
    attempted: u64,
    ok: u64,
    errors: HashMap<&'static str, u64>,
    backends: HashMap<String, u64>,
    connect_us: Vec<u32>,
    total_us: Vec<u32>,
    late_starts: u64,
    elapsed: f64,
    /// The longest wait for the next successful connection (from the start, then between
    /// two successes): how long a service was dark during the run.
    max_gap_us: u64,
}

impl Tally {
    fn fail(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_insert(0) += 1;
    }

    fn merge(&mut self, other: Tally) {
        self.attempted += other.attempted;
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.backends {
            *self.backends.entry(k).or_insert(0) += v;
        }
        self.connect_us.extend(other.connect_us);
        self.total_us.extend(other.total_us);
        self.late_starts += other.late_starts;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.max_gap_us = self.max_gap_us.max(other.max_gap_us);
    }
}

struct ConnsConfig {
    targets: Vec<libc::sockaddr_in>,
    random: bool,
    concurrency: usize,
    rate: f64,
    duration: Duration,
    max_conns: u64,
    timeout: Duration,
    seed: u64,
}

fn conns(opts: &Opts) {
    let threads: usize = opts.num("threads", 1).max(1);
    let concurrency: usize = opts.num("concurrency", 64).max(1);
    let rate: f64 = opts.num("rate", 0.0);
    let max_conns: u64 = opts.num("max-conns", 1_000_000);
    let duration = Duration::from_secs_f64(opts.num("duration", 5.0));
    let random = match opts.str("pick").unwrap_or("random") {
        "random" => true,
        "rr" => false,
        other => usage(&format!("--pick: {other:?} is not random or rr")),
    };
    let targets = targets(opts);
    let timeout = Duration::from_millis(opts.num("timeout-ms", 3000));
    let seed: u64 = opts.num("seed", 0x9E37_79B9_7F4A_7C15);
    let per = |total: f64, i: usize| -> f64 {
        // Split a total over the threads, the remainder to the first ones.
        let base = (total / threads as f64).floor();
        base + if (i as f64) < total - base * threads as f64 { 1.0 } else { 0.0 }
    };
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let cfg = ConnsConfig {
                targets: targets.clone(),
                random,
                concurrency: (per(concurrency as f64, i) as usize).max(1),
                rate: rate / threads as f64,
                duration,
                max_conns: per(max_conns as f64, i) as u64,
                timeout,
                seed: seed ^ ((i as u64 + 1) * 0x2545_F491_4F6C_DD1D),
            };
            std::thread::spawn(move || conns_loop(&cfg))
        })
        .collect();
    let mut tally = Tally::default();
    for handle in handles {
        tally.merge(handle.join().expect("a load thread panicked"));
    }
    print_tally(&mut tally, threads, concurrency, rate);
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn conns_loop(cfg: &ConnsConfig) -> Tally {
    let ep = Epoll::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    let mut slots: Vec<Option<Conn>> = (0..cfg.concurrency).map(|_| None).collect();
    let mut free: Vec<usize> = (0..cfg.concurrency).rev().collect();
    let mut tally = Tally::default();
    let mut rng = cfg.seed | 1;
    let mut next_target = 0usize;
    let start = Instant::now();
    let mut last_ok = start;
    let deadline = start + cfg.duration;
    let interval =
        if cfg.rate > 0.0 { Some(Duration::from_secs_f64(1.0 / cfg.rate)) } else { None };
    let mut next_start = start;
    let mut last_sweep = start;
    let mut in_flight = 0usize;
    loop {
        let now = Instant::now();
        let starting = now < deadline && tally.attempted < cfg.max_conns;
        if !starting && in_flight == 0 {
            break;
        }
        // Start connections: every free slot (closed loop) or those due (open loop).
        while starting && tally.attempted < cfg.max_conns {
            if let Some(step) = interval {
                if next_start > now {
                    break;
                }
                if free.is_empty() {
                    // Over the concurrency cap: this start is skipped, not queued.
                    tally.late_starts += 1;
                    next_start += step;
                    continue;
                }
                next_start += step;
            }
            let Some(slot) = free.pop() else { break };
            let target = if cfg.targets.len() == 1 {
                &cfg.targets[0]
            } else if cfg.random {
                &cfg.targets[(xorshift(&mut rng) % cfg.targets.len() as u64) as usize]
            } else {
                next_target = (next_target + 1) % cfg.targets.len();
                &cfg.targets[next_target]
            };
            tally.attempted += 1;
            match start_conn(&ep, target, slot) {
                Ok(conn) => {
                    slots[slot] = Some(conn);
                    in_flight += 1;
                }
                Err(kind) => {
                    tally.fail(kind);
                    free.push(slot);
                    if kind == "socket" {
                        break; // out of descriptors or ports: let some finish first
                    }
                }
            }
        }
        // Open loop: sleep until the next start, rounded up to whole milliseconds (starts
        // due in the meantime go out together): never a busy wait, whose CPU would be
        // counted as the contenders' cost per connection.
        let wait_ms = match interval {
            Some(_) if starting => {
                let until = next_start.saturating_duration_since(Instant::now());
                until.as_micros().div_ceil(1000) as i32
            }
            _ => 10,
        };
        let n = ep.wait(&mut events, wait_ms.clamp(1, 10));
        for ev in &events[..n] {
            let slot = ev.u64 as usize;
            let Some(conn) = slots[slot].as_mut() else { continue };
            match step_conn(conn, ev.events, &ep) {
                Step::Pending => continue,
                Step::Done => {
                    let conn = slots[slot].take().expect("slot is live");
                    let total = conn.started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    let done = Instant::now();
                    let gap = done.duration_since(last_ok).as_micros() as u64;
                    tally.max_gap_us = tally.max_gap_us.max(gap);
                    last_ok = done;
                    tally.ok += 1;
                    tally.connect_us.push(conn.connected_us);
                    tally.total_us.push(total);
                    *tally.backends.entry(body_name(&conn.buf[..conn.len])).or_insert(0) += 1;
                    close(conn.fd);
                }
                Step::Failed(kind) => {
                    let conn = slots[slot].take().expect("slot is live");
                    tally.fail(kind);
                    close(conn.fd);
                }
            }
            free.push(slot);
            in_flight -= 1;
        }
        // Time out stuck connections (a dropped SYN would otherwise wait for its retransmit).
        let now = Instant::now();
        if now.duration_since(last_sweep) >= Duration::from_millis(20) {
            last_sweep = now;
            for (i, entry) in slots.iter_mut().enumerate() {
                let expired =
                    entry.as_ref().is_some_and(|c| now.duration_since(c.started) > cfg.timeout);
                if expired {
                    let conn = entry.take().expect("checked");
                    tally.fail(if conn.phase == Phase::Connecting {
                        "connect_timeout"
                    } else {
                        "read_timeout"
                    });
                    close(conn.fd);
                    free.push(i);
                    in_flight -= 1;
                }
            }
        }
    }
    tally.elapsed = start.elapsed().as_secs_f64();
    tally
}

fn start_conn(ep: &Epoll, target: &libc::sockaddr_in, slot: usize) -> Result<Conn, &'static str> {
    // SAFETY: plain syscalls on a descriptor we own.
    let fd = unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err("socket");
    }
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    let started = Instant::now();
    // SAFETY: `target` is a valid sockaddr_in.
    let ret = unsafe {
        libc::connect(
            fd,
            (target as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if ret < 0 && errno() != libc::EINPROGRESS {
        let kind = connect_error(errno());
        close(fd);
        return Err(kind);
    }
    ep.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLOUT as u32, slot as u64);
    Ok(Conn {
        fd,
        slot: slot as u64,
        phase: Phase::Connecting,
        started,
        connected_us: 0,
        len: 0,
        buf: [0; 192],
    })
}

fn connect_error(code: i32) -> &'static str {
    match code {
        libc::ECONNREFUSED => "refused",
        libc::ECONNRESET => "reset",
        libc::ETIMEDOUT => "connect_timeout",
        libc::EHOSTUNREACH | libc::ENETUNREACH => "unreachable",
        libc::EADDRNOTAVAIL => "no_port",
        _ => "connect_error",
    }
}

enum Step {
    Pending,
    Done,
    Failed(&'static str),
}

fn step_conn(conn: &mut Conn, events: u32, ep: &Epoll) -> Step {
    if conn.phase == Phase::Connecting {
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid out-parameters for SO_ERROR.
        unsafe {
            libc::getsockopt(
                conn.fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if err != 0 {
            return Step::Failed(connect_error(err));
        }
        if events & (libc::EPOLLOUT as u32) == 0 {
            return Step::Pending;
        }
        conn.connected_us = conn.started.elapsed().as_micros().min(u32::MAX as u128) as u32;
        if write(conn.fd, REQUEST) != REQUEST.len() as isize {
            return Step::Failed("write");
        }
        conn.phase = Phase::Reading;
        ep.ctl(libc::EPOLL_CTL_MOD, conn.fd, libc::EPOLLIN as u32, conn.slot);
        return Step::Pending;
    }
    loop {
        let room = conn.buf.len() - conn.len;
        let mut scratch = [0u8; 512];
        let got = if room > 0 {
            read(conn.fd, &mut conn.buf[conn.len..])
        } else {
            read(conn.fd, &mut scratch)
        };
        if got > 0 {
            if room > 0 {
                conn.len += got as usize;
            }
            continue;
        }
        if got == 0 {
            return if conn.len > 0 { Step::Done } else { Step::Failed("empty") };
        }
        return match errno() {
            libc::EAGAIN => Step::Pending,
            libc::ECONNRESET => Step::Failed("reset"),
            _ => Step::Failed("read_error"),
        };
    }
}

fn body_name(data: &[u8]) -> String {
    let body = match data.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &data[i + 4..],
        None => return "?".to_string(),
    };
    String::from_utf8_lossy(body).trim().to_string()
}

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn lat_json(samples: &mut [u32]) -> String {
    samples.sort_unstable();
    let mean = if samples.is_empty() {
        0.0
    } else {
        samples.iter().map(|&v| v as f64).sum::<f64>() / samples.len() as f64
    };
    format!(
        "{{\"p50\": {}, \"p90\": {}, \"p99\": {}, \"p999\": {}, \"max\": {}, \"mean\": {:.1}}}",
        percentile(samples, 0.50),
        percentile(samples, 0.90),
        percentile(samples, 0.99),
        percentile(samples, 0.999),
        samples.last().copied().unwrap_or(0),
        mean
    )
}

fn json_str(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn print_tally(t: &mut Tally, threads: usize, concurrency: usize, rate: f64) {
    let failed: u64 = t.errors.values().sum();
    let errors: Vec<String> =
        t.errors.iter().map(|(k, v)| format!("{}: {v}", json_str(k))).collect();
    let backends: Vec<String> =
        t.backends.iter().map(|(k, v)| format!("{}: {v}", json_str(k))).collect();
    let per_s = if t.elapsed > 0.0 { t.ok as f64 / t.elapsed } else { 0.0 };
    println!(
        "{{\"attempted\": {}, \"ok\": {}, \"failed\": {}, \"errors\": {{{}}}, \"backends\": {{{}}}, \
         \"elapsed\": {:.6}, \"conns_per_s\": {:.1}, \"late_starts\": {}, \"threads\": {}, \
         \"concurrency\": {}, \"rate\": {}, \"max_gap_us\": {}, \"connect_us\": {}, \
         \"total_us\": {}}}",
        t.attempted,
        t.ok,
        failed,
        errors.join(", "),
        backends.join(", "),
        t.elapsed,
        per_s,
        t.late_starts,
        threads,
        concurrency,
        rate,
        t.max_gap_us,
        lat_json(&mut t.connect_us),
        lat_json(&mut t.total_us),
    );
}

// --- probe -----------------------------------------------------------------------------

fn probe(opts: &Opts) {
    let targets = targets(opts);
    let target = targets[0];
    let expect: Vec<String> = opts
        .all("expect")
        .iter()
        .flat_map(|s| s.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    if expect.is_empty() {
        usage("--expect is required");
    }
    let timeout = Duration::from_secs_f64(opts.num("timeout", 30.0));
    let interval = Duration::from_micros(opts.num("interval-us", 1000));
    let connect_timeout = Duration::from_millis(opts.num("connect-timeout-ms", 100));
    let ep = Epoll::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 4];
    let start = Instant::now();
    let mut attempts = 0u64;
    let mut errors = 0u64;
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut found_at: Option<f64> = None;
    let mut announced = false;
    while start.elapsed() < timeout {
        attempts += 1;
        let began = Instant::now();
        let name = match start_conn(&ep, &target, 0) {
            Err(_) => None,
            Ok(mut conn) => {
                let mut result = None;
                loop {
                    let left = connect_timeout.saturating_sub(began.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    let n = ep.wait(&mut events, (left.as_millis() as i32).max(1));
                    if n == 0 {
                        continue;
                    }
                    match step_conn(&mut conn, events[0].events, &ep) {
                        Step::Pending => continue,
                        Step::Done => {
                            result = Some(body_name(&conn.buf[..conn.len]));
                            break;
                        }
                        Step::Failed(_) => break,
                    }
                }
                close(conn.fd);
                result
            }
        };
        let now = monotonic();
        match &name {
            Some(n) => *seen.entry(n.clone()).or_insert(0) += 1,
            None => errors += 1,
        }
        if !announced {
            println!("ready");
            io::stdout().flush().ok();
            announced = true;
        }
        if name.as_ref().is_some_and(|n| expect.iter().any(|e| e == n)) {
            found_at = Some(now);
            break;
        }
        if let Some(rest) = interval.checked_sub(began.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let seen: Vec<String> = seen.iter().map(|(k, v)| format!("{}: {v}", json_str(k))).collect();
    println!(
        "{{\"found\": {}, \"t_mono\": {}, \"attempts\": {attempts}, \"errors\": {errors}, \"seen\": {{{}}}}}",
        found_at.is_some(),
        found_at.map_or("null".to_string(), |t| format!("{t:.6}")),
        seen.join(", ")
    );
    io::stdout().flush().ok();
}
