//! Privileged tests of the AF_PACKET load balancer against the real kernel:
//!
//! - a real TCP connection from a client to a VIP, through the load balancer (ARP for the
//!   VIP, IP-in-IP to the backend, ICMP "fragmentation needed" for the client's full-size
//!   segments), served by a real server in the backend, whose replies go straight back to
//!   the client;
//! - the same over IPv6 (neighbour discovery, IPv6 in IPv6, "packet too big");
//! - the same with L2 direct routing (no encapsulation, no tunnel on the backend);
//! - failover: connections opened through one load balancer finish through a second one
//!   (same services, same Maglev seed) that never saw them, each on its own backend.
//!
//! Needs root (CAP_NET_ADMIN) and `ip`; runs in CI as root. As another user it prints a
//! notice and returns, except under CI (`CI` set), where it fails: CI must run it.
//!
//! The lab is four brand-new *anonymous* network namespaces, each held by an open file
//! (`unshare` on a short-lived thread, then `/proc/thread-self/ns/net` kept open); work in
//! one runs on a thread that `setns` into it, and every command first checks that its
//! thread is not in the namespace the test started in. Nothing touches the root namespace,
//! and nothing is left over: the kernel frees the namespaces, with their links, once the
//! files and threads are gone, even when the test fails or the process is killed.
//!
//! ```text
//!   client 10.0.0.2 ---+
//!   lb     10.0.0.1 ---+-- br0 (namespace "switch")
//!   backend 10.0.0.3 --+      backend: VIP 10.96.0.10 on lo, an IP-in-IP decapsulator
//! ```
//!
//! The client routes the VIP on-link, so it asks ARP for it and the load balancer answers.
//! The load balancer's kernel has neither the VIP nor forwarding: it drops its copy of each
//! VIP packet (`InAddrErrors`) and forwards nothing (`ForwDatagrams` stays 0), so every
//! reply the client gets came straight from the backend.
//!
//! The backend's tunnel device: this kernel may lack `CONFIG_NET_IPIP` (the CI machine's
//! does). Then a user-space decapsulator plays it: a raw IPPROTO_IPIP socket receives the
//! outer packets (its presence also keeps the kernel from answering "protocol
//! unreachable") and an IPPROTO_RAW socket hands each inner packet to the backend's own
//! stack, which delivers it to the VIP on loopback as an `ipip` device would.

#![cfg(target_os = "linux")]

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fastpath::datapath::afpacket::{
    interface_info, Forwarding, LbConfig, LbWorkers, Neighbours, WorkerConfig,
};
use fastpath::engine::{Engine, EngineConfig};
use fastpath::policy::PolicyKind;
use fastpath::service::{BackendSpec, Conditions, Frontend, ServiceSpec};
use fastpath::Protocol;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const PORT: u16 = 8080;
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// More than one full-size segment: the first of them cannot fit once encapsulated.
const UPLOAD: usize = 6000;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn thread_netns() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").expect("readlink /proc/thread-self/ns/net")
}

/// An anonymous network namespace, alive while this file is open.
struct Netns {
    name: &'static str,
    file: File,
    root: PathBuf,
}

impl Netns {
    fn new(name: &'static str) -> Netns {
        let root = thread_netns();
        let file = std::thread::spawn(move || {
            // SAFETY: unshare only changes the calling thread's namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
            File::open("/proc/thread-self/ns/net").expect("open the new namespace")
        })
        .join()
        .expect("namespace thread");
        let ns = Netns { name, file, root };
        ns.run("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// A path other processes can open this namespace by (for `ip ... netns PATH`).
    fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd())
    }

    /// Runs `f` on a new thread inside this namespace.
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let fd = self.file.try_clone().expect("dup namespace fd");
        let root = self.root.clone();
        std::thread::spawn(move || {
            // SAFETY: setns only changes the calling thread's namespace; `fd` is a netns.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            assert_ne!(thread_netns(), root, "still in the namespace the test started in");
            f()
        })
    }

    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    fn run(&self, cmd: &str, args: &[&str]) -> String {
        let (cmd, args): (String, Vec<String>) =
            (cmd.into(), args.iter().map(|a| a.to_string()).collect());
        let name = self.name;
        self.within(move || {
            let out =
                Command::new(&cmd).args(&args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
            assert!(
                out.status.success(),
                "[{name}] {cmd} {args:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    }

    fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.within(move || std::fs::write(&path, value).unwrap_or_else(|e| panic!("{path}: {e}")));
    }

    /// A counter of `/proc/net/snmp`'s `Ip:` lines, as this namespace counts it.
    fn ip_counter(&self, name: &'static str) -> u64 {
        self.within(move || {
            let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
            let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
            let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
            let at = names.split_whitespace().position(|n| n == name).expect(name);
            values.split_whitespace().nth(at).unwrap().parse().unwrap()
        })
    }
}

/// The lab of the module docs; the interface in each end namespace is `eth0`.
struct Lab {
    _switch: Netns,
    client: Netns,
    lb: Netns,
    backend: Netns,
}

impl Lab {
    fn new() -> Lab {
        let switch = Netns::new("switch");
        let (client, lb, backend) = (Netns::new("client"), Netns::new("lb"), Netns::new("backend"));
        switch.run("ip", &["link", "add", "br0", "type", "bridge"]);
        switch.run("ip", &["link", "set", "br0", "up"]);
        for (ns, port, addr) in [
            (&client, "p-client", CLIENT_ADDR),
            (&lb, "p-lb", LB_ADDR),
            (&backend, "p-backend", BACKEND_ADDR),
        ] {
            let path = ns.path();
            switch.run(
                "ip",
                &["link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", &path],
            );
            switch.run("ip", &["link", "set", port, "master", "br0", "up"]);
            ns.run("ip", &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns.run("ip", &["link", "set", "eth0", "up"]);
        }
        // The load balancer's node neither forwards nor has the VIP.
        lb.sysctl("net.ipv4.ip_forward", "0");
        // The client asks ARP for the VIP (on-link), and sends no multi-segment GSO
        // packets, which a real link would never carry whole.
        client.run("ip", &["route", "add", &format!("{VIP}/32"), "dev", "eth0"]);
        client.run("ip", &["link", "set", "eth0", "gso_max_segs", "1"]);
        // The backend: the VIP on loopback, never announced or answered for in ARP (else
        // the client would find the backend itself at the VIP, as LVS-DR backends do), and
        // no source check on the decapsulated path.
        backend.sysctl("net.ipv4.conf.all.arp_ignore", "1");
        backend.sysctl("net.ipv4.conf.all.arp_announce", "2");
        backend.run("ip", &["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
        backend.sysctl("net.ipv4.conf.all.rp_filter", "0");
        backend.sysctl("net.ipv4.conf.default.rp_filter", "0");
        Lab { _switch: switch, client, lb, backend }
    }
}

/// The backend's tunnel "device" (see the module docs): raw sockets take the IP-in-IP
/// (IPv4, protocol 4) or IPv6-in-IPv6 (next header 41) packets and send the inner packet on
/// to its destination. Stops when `stop` is set; returns how many it passed on.
fn decapsulate(v6: bool, stop: Arc<AtomicBool>) -> io::Result<std::thread::JoinHandle<u64>> {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let open = |proto| {
        // SAFETY: plain syscall with constant arguments.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let rx = open(if v6 { libc::IPPROTO_IPV6 } else { libc::IPPROTO_IPIP })?;
    let tx = open(libc::IPPROTO_RAW)?;
    let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
    // SAFETY: `tv` is a valid timeval of the given size.
    unsafe {
        libc::setsockopt(
            rx.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let mut n_inner = 0;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            let got = &buf[..n as usize];
            // Raw IPv4 sockets hand over the outer header too; raw IPv6 ones its payload,
            // which is the inner packet.
            let inner = if v6 { got } else { &got[usize::from(got[0] & 0x0f) * 4..] };
            let (header, version) = if v6 { (40, 6) } else { (20, 4) };
            if inner.len() < header || inner[0] >> 4 != version {
                continue;
            }
            if send_inner(&tx, inner, v6) > 0 {
                n_inner += 1;
            }
        }
        n_inner
    }))
}

/// Sends `inner` (an IPv4 or IPv6 packet) on the raw socket `tx` to its destination.
fn send_inner(tx: &OwnedFd, inner: &[u8], v6: bool) -> isize {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut to4: libc::sockaddr_in = unsafe { mem::zeroed() };
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut to6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
    let (to, len): (*const libc::sockaddr, usize) = if v6 {
        to6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        to6.sin6_addr.s6_addr.copy_from_slice(&inner[24..40]);
        ((&to6 as *const libc::sockaddr_in6).cast(), mem::size_of::<libc::sockaddr_in6>())
    } else {
        to4.sin_family = libc::AF_INET as libc::sa_family_t;
        to4.sin_addr.s_addr = u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]);
        ((&to4 as *const libc::sockaddr_in).cast(), mem::size_of::<libc::sockaddr_in>())
    };
    // SAFETY: `inner` and `to` are valid for reads of their lengths.
    unsafe {
        libc::sendto(
            tx.as_raw_fd(),
            inner.as_ptr().cast(),
            inner.len(),
            0,
            to,
            len as libc::socklen_t,
        )
    }
}

fn service() -> ServiceSpec {
    ServiceSpec {
        name: "default/web:http".into(),
        frontends: vec![Frontend { addr: VIP.into(), port: PORT, proto: Protocol::Tcp }],
        backends: vec![BackendSpec {
            addr: SocketAddr::new(BACKEND_ADDR.into(), PORT),
            weight: 1,
            conditions: Conditions::READY,
            local: false,
        }],
        policy: Some(PolicyKind::Maglev),
        affinity_timeout: None,
        hash_key: None,
        short_circuit: None,
    }
}

#[test]
fn a_tcp_connection_to_the_vip_is_served_by_the_backend_with_direct_return() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root: this test must not skip");
        eprintln!("NOTICE: afpacket_privileged: not root, skipping");
        return;
    }
    let lab = Lab::new();
    let stop = Arc::new(AtomicBool::new(false));

    // The backend: the decapsulator and a server that counts what it got and says so.
    let stop2 = stop.clone();
    let decap = lab.backend.within(move || decapsulate(false, stop2)).expect("raw sockets");
    let listener = lab
        .backend
        .within(|| TcpListener::bind(SocketAddrV4::new(VIP, PORT)))
        .expect("bind the VIP on the backend");
    let server = std::thread::spawn(move || -> io::Result<usize> {
        // Never blocks the test for good: a connection that does not come is an error.
        listener.set_nonblocking(true)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got)?;
        conn.write_all(format!("backend got {} bytes", got.len()).as_bytes())?;
        Ok(got.len())
    });

    // The load balancer, two workers in one fanout group.
    let backend_mac = lab.backend.within(|| interface_info("eth0")).unwrap().mac;
    let (workers, lb_mac) = lab.lb.within(move || {
        let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
        engine.upsert_service(&service()).unwrap();
        let info = interface_info("eth0").unwrap();
        let mut cfg = LbConfig::new(info.mac, info.mtu);
        cfg.ipv4 = Some(LB_ADDR);
        cfg.vips.insert(IpAddr::V4(VIP));
        cfg.neighbours = Neighbours::new(None);
        cfg.neighbours.insert(BACKEND_ADDR.into(), backend_mac);
        let w = LbWorkers::start(&WorkerConfig::new("eth0", 2), engine, Arc::new(cfg))
            .expect("start the AF_PACKET workers");
        (w, info.mac)
    });
    let in_addr_errors = lab.lb.ip_counter("InAddrErrors");

    // The client: connect to the VIP, upload, read the answer.
    let answer = lab.client.within(|| -> io::Result<String> {
        let vip = SocketAddr::new(VIP.into(), PORT);
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&vec![b'x'; UPLOAD])?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    });
    // The workers read the ring's statistics every 200 ms.
    std::thread::sleep(Duration::from_millis(400));
    let stats = workers.total();
    stop.store(true, Ordering::Relaxed);
    let served = server.join().unwrap();
    let decapsulated = decap.join().unwrap();
    let neigh = lab.client.run("ip", &["neigh", "show", &VIP.to_string()]);
    let lb_forwarded = lab.lb.ip_counter("ForwDatagrams");
    let lb_dropped = lab.lb.ip_counter("InAddrErrors") - in_addr_errors;
    drop(workers);

    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
    let report = format!("{stats:?}\nclient neigh: {neigh}decapsulated {decapsulated}\nanswer {answer:?} served {served:?}");
    assert_eq!(answer.as_deref().ok(), Some(&*format!("backend got {UPLOAD} bytes")), "{report}");
    assert_eq!(served.ok(), Some(UPLOAD));
    // The client found the VIP at the load balancer's MAC, by its ARP answer.
    assert!(neigh.contains(&lb_mac.to_string()), "{report}");
    assert!(get("tx_arp_reply") >= 1, "{report}");
    // Every client packet (SYN, data, FIN, ACKs) went through the load balancer...
    assert!(get("tx_forward") >= 4, "{report}");
    assert_eq!(get("tx_frames"), get("tx_forward") + get("tx_arp_reply") + get("tx_too_big"));
    assert!(decapsulated >= 4, "{report}");
    // ...the full-size segments came back as "fragmentation needed" and were sent again
    // smaller (the upload completed)...
    assert!(get("tx_too_big") >= 1, "{report}");
    // ...and the load balancer's kernel dropped its own copies and routed nothing: the
    // replies came straight from the backend.
    assert_eq!(lb_forwarded, 0, "{report}");
    assert!(lb_dropped >= get("tx_forward"), "kernel dropped {lb_dropped}: {report}");
    assert_eq!((get("tx_errors"), get("ring_drops")), (0, 0), "{report}");
    // The kernel's ring counters are read every 200 ms: they lag, but they are read.
    assert!(get("ring_packets") > 0 && get("rx_frames") > 0, "{report}");
    eprintln!("afpacket_privileged: {report}");
}

/// Backend `addr` of the failover lab: VIP on loopback, the decapsulator, and a server that
/// answers every connection with the number of bytes it got; returns those numbers.
fn start_backend(ns: &Netns, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<usize>> {
    ns.sysctl("net.ipv4.conf.all.arp_ignore", "1");
    ns.sysctl("net.ipv4.conf.all.arp_announce", "2");
    ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
    ns.sysctl("net.ipv4.conf.default.rp_filter", "0");
    ns.run("ip", &["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    let stop2 = stop.clone();
    let decap = ns.within(move || decapsulate(false, stop2)).expect("raw sockets");
    let listener = ns.within(|| TcpListener::bind(SocketAddrV4::new(VIP, PORT))).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut conns = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut c, _)) => conns.push(std::thread::spawn(move || {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                    let mut got = Vec::new();
                    let _ = c.read_to_end(&mut got);
                    let _ = c.write_all(format!("backend got {} bytes", got.len()).as_bytes());
                    got.len()
                })),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        let _ = decap.join();
        conns.into_iter().filter_map(|c| c.join().ok()).collect()
    })
}

fn start_lb(
    ns: &Netns,
    address: Ipv4Addr,
    backends: Vec<(Ipv4Addr, fastpath::wire::MacAddr)>,
) -> LbWorkers {
    ns.within(move || {
        let mut ec = EngineConfig::default();
        ec.table.maglev.seed = 42; // the same on both load balancers
        let engine = Arc::new(Engine::new(ec).unwrap());
        let mut spec = service();
        spec.backends = backends
            .iter()
            .map(|(ip, _)| BackendSpec {
                addr: SocketAddr::new((*ip).into(), PORT),
                weight: 1,
                conditions: Conditions::READY,
                local: false,
            })
            .collect();
        engine.upsert_service(&spec).unwrap();
        let info = interface_info("eth0").unwrap();
        let mut cfg = LbConfig::new(info.mac, info.mtu);
        cfg.ipv4 = Some(address);
        cfg.vips.insert(IpAddr::V4(VIP));
        for (ip, mac) in backends {
            cfg.neighbours.insert(ip.into(), mac);
        }
        LbWorkers::start(&WorkerConfig::new("eth0", 2), engine, Arc::new(cfg)).unwrap()
    })
}

/// Two load balancers with the same services and Maglev seed; four connections open
/// through the first, which then stops (the client's next hop for the VIP moves to the
/// second, as a router's would). The second has never seen these flows, yet every
/// connection finishes on the backend it started on: a wrong pick would reach a backend
/// with no such connection, which resets it.
#[test]
fn established_connections_survive_the_loss_of_their_load_balancer() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root: this test must not skip");
        eprintln!("NOTICE: afpacket_privileged: not root, skipping");
        return;
    }
    const CONNS: usize = 4;
    let switch = Netns::new("switch");
    switch.run("ip", &["link", "add", "br0", "type", "bridge"]);
    switch.run("ip", &["link", "set", "br0", "up"]);
    let names = ["client", "lb1", "lb2", "backend1", "backend2"];
    let nets: Vec<Netns> = names.iter().map(|n| Netns::new(n)).collect();
    for (i, ns) in nets.iter().enumerate() {
        let path = ns.path();
        let port = format!("p{i}");
        switch.run(
            "ip",
            &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &path],
        );
        switch.run("ip", &["link", "set", &port, "master", "br0", "up"]);
        ns.run("ip", &["addr", "add", &format!("10.0.0.{}/24", 10 + i), "dev", "eth0"]);
        ns.run("ip", &["link", "set", "eth0", "up"]);
    }
    let [client, lb1, lb2, b1, b2] = &nets[..] else { unreachable!() };
    client.run("ip", &["link", "set", "eth0", "gso_max_segs", "1"]);
    client.run("ip", &["route", "add", &format!("{VIP}/32"), "dev", "eth0"]);
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [start_backend(b1, stop.clone()), start_backend(b2, stop.clone())];
    let backends: Vec<_> = [(b1, 13), (b2, 14)]
        .iter()
        .map(|(ns, host)| {
            (Ipv4Addr::new(10, 0, 0, *host), ns.within(|| interface_info("eth0")).unwrap().mac)
        })
        .collect();
    let mut first = start_lb(lb1, Ipv4Addr::new(10, 0, 0, 11), backends.clone());
    let second = start_lb(lb2, Ipv4Addr::new(10, 0, 0, 12), backends);
    let lb_mac = |ns: &Netns| ns.within(|| interface_info("eth0")).unwrap().mac.to_string();
    let (lb1_mac, lb2_mac) = (lb_mac(lb1), lb_mac(lb2));
    let vip = VIP.to_string();
    client.run(
        "ip",
        &["neigh", "replace", &vip, "lladdr", &lb1_mac, "dev", "eth0", "nud", "permanent"],
    );

    // Open the connections and send half of each upload through the first load balancer.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let clients = client.spawn(move || -> io::Result<Vec<String>> {
        let to = SocketAddr::new(VIP.into(), PORT);
        let mut streams = Vec::new();
        for _ in 0..CONNS {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(15)))?;
            s.write_all(&vec![b'x'; UPLOAD / 2])?;
            streams.push(s);
        }
        std::thread::sleep(Duration::from_millis(300)); // let the first halves arrive
        opened_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let mut answers = Vec::new();
        for mut s in streams {
            s.write_all(&vec![b'y'; UPLOAD / 2])?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut a = String::new();
            s.read_to_string(&mut a)?;
            answers.push(a);
        }
        Ok(answers)
    });
    if opened_rx.recv_timeout(Duration::from_secs(20)).is_err() {
        panic!("the connections did not open: {:?}", clients.join());
    }
    let first_forwarded = first.total_of("tx_forward");
    first.stop();
    client.run(
        "ip",
        &["neigh", "replace", &vip, "lladdr", &lb2_mac, "dev", "eth0", "nud", "permanent"],
    );
    go_tx.send(()).unwrap();
    let answers = clients.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let second_stats = second.total();
    stop.store(true, Ordering::Relaxed);
    let served: Vec<Vec<usize>> = servers.into_iter().map(|s| s.join().unwrap()).collect();
    drop(second);

    let get = |k: &str| second_stats.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
    let report = format!("answers {answers:?}\nserved {served:?}\nsecond {second_stats:?}");
    let want = format!("backend got {UPLOAD} bytes");
    assert_eq!(answers.as_ref().ok(), Some(&vec![want; CONNS]), "{report}");
    let mut all: Vec<usize> = served.concat();
    all.sort();
    assert_eq!(all, vec![UPLOAD; CONNS], "each connection whole on one backend: {report}");
    assert!(first_forwarded >= CONNS as u64 * 2, "{report}");
    assert!(get("tx_forward") >= CONNS as u64, "the second carried the rest: {report}");
    eprintln!("failover: {report}");
}

/// The first test over IPv6: neighbour discovery for the VIP, IPv6 in IPv6, "packet too
/// big" for the client's full-size segments, direct return.
#[test]
fn a_tcp_connection_to_an_ipv6_vip_is_served_with_direct_return() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root: this test must not skip");
        eprintln!("NOTICE: afpacket_privileged: not root, skipping");
        return;
    }
    let vip6: std::net::Ipv6Addr = "fd00:96::10".parse().unwrap();
    let lb_addr: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
    let backend_addr: std::net::Ipv6Addr = "fd00::3".parse().unwrap();
    let switch = Netns::new("switch");
    switch.run("ip", &["link", "add", "br0", "type", "bridge"]);
    switch.run("ip", &["link", "set", "br0", "up"]);
    let (client, lb, backend) = (Netns::new("client"), Netns::new("lb"), Netns::new("backend"));
    for ns in [&client, &lb, &backend] {
        // No duplicate address detection on the links to come: a tentative link-local
        // address holds up neighbour discovery for a second or more.
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
    }
    for (i, (ns, addr)) in
        [(&client, "fd00::2"), (&lb, "fd00::1"), (&backend, "fd00::3")].iter().enumerate()
    {
        let (path, port) = (ns.path(), format!("p{i}"));
        switch.run(
            "ip",
            &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &path],
        );
        switch.run("ip", &["link", "set", &port, "master", "br0", "up"]);
        ns.run("ip", &["-6", "addr", "add", &format!("{addr}/64"), "dev", "eth0", "nodad"]);
        ns.run("ip", &["link", "set", "eth0", "up"]);
    }
    lb.sysctl("net.ipv6.conf.all.forwarding", "0");
    // Unlike IPv4's, the IPv6 stack answers a packet it cannot route with ICMPv6 "no
    // route" even when not forwarding, which aborts the client's connect: the VIP is
    // routed to a blackhole, where the kernel drops its copy silently.
    lb.run("ip", &["-6", "route", "add", "blackhole", &format!("{vip6}/128")]);
    client.run("ip", &["-6", "route", "add", &format!("{vip6}/128"), "dev", "eth0"]);
    client.run("ip", &["link", "set", "eth0", "gso_max_segs", "1"]);
    backend.run("ip", &["-6", "addr", "add", &format!("{vip6}/128"), "dev", "lo", "nodad"]);

    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let decap = backend.within(move || decapsulate(true, stop2)).expect("raw sockets");
    let listener = backend
        .within(move || TcpListener::bind(SocketAddr::new(vip6.into(), PORT)))
        .expect("bind the VIP");
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || -> io::Result<usize> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got)?;
        conn.write_all(format!("backend got {} bytes", got.len()).as_bytes())?;
        Ok(got.len())
    });

    let backend_mac = backend.within(|| interface_info("eth0")).unwrap().mac;
    let (workers, lb_mac) = lb.within(move || {
        let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
        let mut spec = service();
        spec.frontends[0].addr = vip6.into();
        spec.backends[0].addr = SocketAddr::new(backend_addr.into(), PORT);
        engine.upsert_service(&spec).unwrap();
        let info = interface_info("eth0").unwrap();
        let mut cfg = LbConfig::new(info.mac, info.mtu);
        cfg.ipv6 = Some(lb_addr);
        cfg.vips.insert(IpAddr::V6(vip6));
        cfg.neighbours.insert(backend_addr.into(), backend_mac);
        let w = LbWorkers::start(&WorkerConfig::new("eth0", 2), engine, Arc::new(cfg)).unwrap();
        (w, info.mac)
    });

    let answer = client.within(move || -> io::Result<String> {
        let to = SocketAddr::new(vip6.into(), PORT);
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&vec![b'x'; UPLOAD])?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    });
    std::thread::sleep(Duration::from_millis(100));
    let stats = workers.total();
    stop.store(true, Ordering::Relaxed);
    let served = server.join().unwrap();
    let decapsulated = decap.join().unwrap();
    let neigh = client.run("ip", &["-6", "neigh", "show", &vip6.to_string()]);
    drop(workers);

    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
    let report = format!(
        "{stats:?}\nneigh {neigh}decapsulated {decapsulated}\nanswer {answer:?} served {served:?}"
    );
    assert_eq!(answer.as_deref().ok(), Some(&*format!("backend got {UPLOAD} bytes")), "{report}");
    assert!(neigh.contains(&lb_mac.to_string()), "{report}");
    assert!(get("tx_neighbor_advert") >= 1, "{report}");
    assert!(get("tx_forward") >= 4 && decapsulated >= 4, "{report}");
    assert!(get("tx_too_big") >= 1, "{report}");
}

/// The first test with L2 direct routing (IPVS "DR"): the backend shares the segment, gets
/// the client's frame with only its MACs changed, and needs no tunnel device at all.
#[test]
fn l2_direct_routing_serves_a_tcp_connection_without_a_tunnel() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root: this test must not skip");
        eprintln!("NOTICE: afpacket_privileged: not root, skipping");
        return;
    }
    let (answer, stats, lb_forwarded) = l2_dsr_upload(Lab::new(), UPLOAD);
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
    let report = format!("{stats:?}\nanswer {answer:?}");
    assert_eq!(answer.as_deref().ok(), Some(&*format!("backend got {UPLOAD} bytes")), "{report}");
    assert!(get("tx_forward") >= 4 && get("tx_arp_reply") >= 1, "{report}");
    assert_eq!((get("tx_too_big"), lb_forwarded), (0, 0), "no overhead, nothing routed: {report}");
}

/// A veth hands the client's GSO super-packets (up to 64 kB) to the ring whole, as a NIC
/// with GRO would: with virtio headers they go on whole to the backend, and a bulk upload
/// arrives complete, none of it answered as too big or dropped.
#[test]
fn l2_direct_routing_forwards_gso_super_packets_whole() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root: this test must not skip");
        eprintln!("NOTICE: afpacket_privileged: not root, skipping");
        return;
    }
    const BULK: usize = 32 << 20;
    let lab = Lab::new();
    lab.client.run("ip", &["link", "set", "eth0", "gso_max_segs", "65535"]);
    let (answer, stats, _) = l2_dsr_upload(lab, BULK);
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
    let report = format!("{stats:?}\nanswer {answer:?}");
    assert_eq!(answer.as_deref().ok(), Some(&*format!("backend got {BULK} bytes")), "{report}");
    assert!(get("rx_gso") > 0, "the client sent no GSO frames: the test tests nothing: {report}");
    let dropped: u64 = stats.iter().filter(|(k, _)| k.starts_with("drops_")).map(|(_, v)| v).sum();
    assert_eq!((get("tx_too_big"), dropped, get("tx_errors")), (0, 0, 0), "{report}");
}

/// `upload` bytes from the client to the VIP through an L2 direct-routing load balancer
/// (two workers); the backend's answer, the load balancer's counters and the packets its
/// kernel routed.
fn l2_dsr_upload(lab: Lab, upload: usize) -> (io::Result<String>, Vec<(String, u64)>, u64) {
    let listener = lab
        .backend
        .within(|| TcpListener::bind(SocketAddrV4::new(VIP, PORT)))
        .expect("bind the VIP on the backend");
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || -> io::Result<usize> {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = Vec::new();
        conn.read_to_end(&mut got)?;
        // Every byte where it belongs, not only the count (forwarded frames are spliced).
        let intact = got.iter().enumerate().all(|(i, b)| *b == pattern(i));
        let verdict = if intact { "" } else { ", not the bytes sent" };
        conn.write_all(format!("backend got {} bytes{verdict}", got.len()).as_bytes())?;
        Ok(got.len())
    });
    let backend_mac = lab.backend.within(|| interface_info("eth0")).unwrap().mac;
    let workers = lab.lb.within(move || {
        let engine = Arc::new(Engine::new(EngineConfig::default()).unwrap());
        engine.upsert_service(&service()).unwrap();
        let info = interface_info("eth0").unwrap();
        let mut cfg = LbConfig::new(info.mac, info.mtu);
        cfg.forwarding = Forwarding::L2Dsr;
        cfg.vips.insert(IpAddr::V4(VIP));
        cfg.neighbours.insert(BACKEND_ADDR.into(), backend_mac);
        LbWorkers::start(&WorkerConfig::new("eth0", 2), engine, Arc::new(cfg)).unwrap()
    });
    let answer = lab.client.within(move || -> io::Result<String> {
        let vip = SocketAddr::new(VIP.into(), PORT);
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(&(0..upload).map(pattern).collect::<Vec<u8>>())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    });
    std::thread::sleep(Duration::from_millis(100));
    let stats = workers.total();
    let _ = server.join().unwrap();
    let lb_forwarded = lab.lb.ip_counter("ForwDatagrams");
    drop(workers);
    (answer, stats, lb_forwarded)
}

/// The upload's byte at offset `i`: a sequence that no shifted or repeated piece matches.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}
