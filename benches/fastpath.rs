//! Criterion benches of the fast path's core. Run: `cargo bench -p fastpath`.
//! Figures and targets are recorded in benches/README.md.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use fastpath::conntrack::{Binding, ConnTable, ConntrackConfig};
use fastpath::engine::{Engine, EngineConfig};
use fastpath::policy::{HashKey, Maglev, MaglevConfig, PolicyKind};
use fastpath::service::{
    Backend, BackendHandle, BackendId, BackendSpec, Conditions, Frontend, ServiceId, ServiceSpec,
};
use fastpath::{FlowKey, Protocol, TcpFlags};

const SEC: u64 = 1_000_000_000;

fn vip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i))
}

fn spec(i: u32, backends: u32, policy: PolicyKind) -> ServiceSpec {
    ServiceSpec {
        name: format!("default/svc-{i}:http"),
        frontends: vec![Frontend { addr: vip(i), port: 80, proto: Protocol::Tcp }],
        backends: (0..backends)
            .map(|b| BackendSpec {
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i * 8 + b)), 8080),
                weight: 1,
                conditions: Conditions::READY,
                local: false,
            })
            .collect(),
        policy: Some(policy),
        affinity_timeout: None,
        hash_key: None,
        short_circuit: None,
    }
}

fn client_flow(n: u64, service: u32) -> FlowKey {
    FlowKey::new(
        Protocol::Tcp,
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (n >> 14) as u32)),
        1024 + (n & 0x3fff) as u16,
        vip(service),
        80,
    )
}

/// A 40-byte IPv4 TCP SYN to `vip(0):80`, as a datapath receives it.
fn syn_packet(n: u64) -> Vec<u8> {
    let mut p = vec![
        0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0x60, 0, 0, //
        0, 0, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];
    p[20..22].copy_from_slice(&(1024 + (n & 0x3fff) as u16).to_be_bytes());
    p[12..16].copy_from_slice(&(0x0a00_0000u32 + (n >> 14) as u32).to_be_bytes());
    p
}

fn engine_with(services: u32, policy: PolicyKind) -> Engine {
    let e = Engine::new(EngineConfig {
        conntrack: ConntrackConfig { capacity: 1 << 16, ..ConntrackConfig::default() },
        ..EngineConfig::default()
    })
    .unwrap();
    for i in 0..services {
        e.upsert_service(&spec(i, 3, policy)).unwrap();
    }
    e
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");
    // Established: the flow is in the connection table; an ACK arrives.
    let e = engine_with(1, PolicyKind::Random);
    let flow = client_flow(1, 0);
    e.decide_flow(&flow, Some(TcpFlags(TcpFlags::SYN)), SEC);
    g.bench_function("established_flow", |b| {
        b.iter(|| {
            black_box(e.decide_flow(black_box(&flow), Some(TcpFlags(TcpFlags::ACK)), 2 * SEC))
        })
    });
    let pkt = syn_packet(1);
    g.bench_function("established_flow_from_packet", |b| {
        b.iter(|| black_box(e.decide_packet(black_box(&pkt), 2 * SEC)))
    });
    // New flows: every iteration is a new 5-tuple (the table is large enough to not evict).
    for policy in PolicyKind::ALL {
        let e = engine_with(1, policy);
        let mut n = 0u64;
        g.bench_function(BenchmarkId::new("new_flow", policy.as_str()), |b| {
            b.iter(|| {
                n += 1;
                black_box(e.decide_flow(&client_flow(n, 0), Some(TcpFlags(TcpFlags::SYN)), SEC))
            })
        });
    }
    g.finish();
}

fn maglev_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build_m65537");
    g.sample_size(20);
    for n in [10u32, 100, 1000] {
        let pool: Vec<Backend> = (0..n)
            .map(|i| {
                let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i)), 8080);
                Backend::new(Arc::new(BackendHandle::new(BackendId(i), addr)), 1)
            })
            .collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &pool, |b, pool| {
            b.iter(|| black_box(Maglev::new(pool, &MaglevConfig::default(), HashKey::FiveTuple)))
        });
    }
    g.finish();
}

fn conntrack_1m(c: &mut Criterion) {
    const N: u64 = 1 << 20;
    let table =
        ConnTable::new(ConntrackConfig { capacity: 2 * N as usize, ..ConntrackConfig::default() });
    let backend = Arc::new(BackendHandle::new(BackendId(1), "10.244.0.1:8080".parse().unwrap()));
    let binding = Binding { service: ServiceId(1), backend };
    for n in 0..N {
        table.insert(client_flow(n, 0), binding.clone(), Some(TcpFlags(TcpFlags::SYN)), SEC);
    }
    let mut g = c.benchmark_group("conntrack_1m_entries");
    let mut i = 0u64;
    g.bench_function("lookup_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            black_box(table.lookup(&client_flow(i, 0), Some(TcpFlags(TcpFlags::ACK)), 2 * SEC))
        })
    });
    let mut j = N;
    g.bench_function("insert_remove", |b| {
        b.iter(|| {
            j += 1;
            let k = client_flow(j, 1);
            table.insert(k, binding.clone(), Some(TcpFlags(TcpFlags::SYN)), SEC);
            black_box(table.remove(&k))
        })
    });
    g.finish();
}

fn service_update(c: &mut Criterion) {
    let mut g = c.benchmark_group("update_one_service");
    g.sample_size(30);
    for total in [10u32, 10_000] {
        let e = engine_with(total, PolicyKind::Random);
        let mut k = 0u32;
        g.bench_function(BenchmarkId::new("random_3_backends", total), |b| {
            b.iter_batched(
                || {
                    k = k.wrapping_add(1);
                    let mut s = spec(total / 2, 3, PolicyKind::Random);
                    s.backends[0].weight = 1 + k % 2;
                    s
                },
                |s| black_box(e.upsert_service(&s).unwrap()),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// A batch of one changed service staged and committed into tables of growing size: the
/// cost must not grow with the table (persistent maps, one snapshot swap).
fn batch_update(c: &mut Criterion) {
    let mut g = c.benchmark_group("stage_commit_one_service");
    g.sample_size(30);
    for total in [10_000u32, 100_000] {
        let e = engine_with(total, PolicyKind::Random);
        let mut k = 0u32;
        g.bench_function(BenchmarkId::new("random_3_backends", total), |b| {
            b.iter_batched(
                || {
                    k = k.wrapping_add(1);
                    let mut s = spec(total / 2, 3, PolicyKind::Random);
                    s.backends[0].weight = 1 + k % 2;
                    [s]
                },
                |batch| {
                    let staged = e.stage(&batch, &[]);
                    assert!(staged.refused.is_empty());
                    e.commit(black_box(staged)).unwrap()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// The AF_PACKET load balancer's per-packet work for an established flow: an Ethernet frame
/// in (a 64-byte IPv4 TCP ACK), parse, connection-table lookup (Maglev service, 3
/// backends), and the IP-in-IP frame to the backend written out.
#[cfg(target_os = "linux")]
fn afpacket(c: &mut Criterion) {
    use fastpath::datapath::afpacket::forward::testbed;
    use fastpath::datapath::afpacket::{Outcome, TxKind};
    use fastpath::wire::PacketBuilder;

    let lb = testbed::forwarder();
    let key = FlowKey::new(
        Protocol::Tcp,
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
        40000,
        IpAddr::V4(testbed::VIP4),
        80,
    );
    let syn = testbed::frame(&PacketBuilder::new(key).build());
    let ack = testbed::frame(
        &PacketBuilder {
            tcp_flags: TcpFlags(TcpFlags::ACK),
            payload: vec![0; 24],
            ..PacketBuilder::new(key)
        }
        .build(),
    );
    let mut out = vec![0u8; 2048];
    assert!(matches!(
        lb.process(&syn, SEC, &mut out),
        Outcome::Transmit { kind: TxKind::Forward, .. }
    ));
    let mut g = c.benchmark_group("afpacket");
    g.bench_function("established flow: parse + lookup + encapsulate", |b| {
        b.iter(|| black_box(lb.process(black_box(&ack), 2 * SEC, &mut out)))
    });
    g.finish();
}

#[cfg(not(target_os = "linux"))]
fn afpacket(_: &mut Criterion) {}

criterion_group!(
    benches,
    decisions,
    maglev_build,
    conntrack_1m,
    service_update,
    batch_update,
    afpacket
);
criterion_main!(benches);
