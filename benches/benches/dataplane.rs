//! The data path's per-packet cost under BPF_PROG_TEST_RUN (the same setup as
//! `cargo xtask bench dataplane`: see `benches::dataplane`), measured by criterion, plus the
//! userspace work behind programming services: Maglev tables and syncing many services.

use std::{
    hint::black_box,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use benches::dataplane::{Setup, service};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ebpf_dataplane::{Config, Dataplane, maglev};

/// Criterion asks for `iters` packets and gets the kernel's own time for them back (each packet
/// one BPF_PROG_TEST_RUN over a different flow), so the syscall around it is not part of the
/// figure. The measurement window is short: each packet costs a syscall of wall time.
fn per_packet(c: &mut Criterion) {
    let mut group = c.benchmark_group("per_packet");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_millis(300));
    for services in [1u32, 10_000] {
        let mut setup = Setup::new(services).expect("set up the data plane (run as root)");
        group.bench_function(BenchmarkId::new("floor_tc", services), |b| {
            b.iter_custom(|iters| setup.tc_floor(iters).expect("test run"))
        });
        group.bench_function(BenchmarkId::new("established", services), |b| {
            b.iter_custom(|iters| setup.established(iters).expect("test run"))
        });
        group.bench_function(BenchmarkId::new("new_flow", services), |b| {
            b.iter_custom(|iters| setup.new_flow(iters).expect("test run"))
        });
    }
    group.finish();
}

fn maglev_tables(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_table");
    for (backends, m) in [(10u8, 16_381u32), (100, 16_381), (10, 65_537)] {
        let list: Vec<SocketAddrV4> = (0..backends)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 1, i, 1), 8080))
            .collect();
        group.bench_function(BenchmarkId::new(format!("{backends}_backends"), m), |b| {
            b.iter(|| maglev::table(black_box(&list), m))
        });
    }
    group.finish();
}

/// Programming 10,000 services of 10 backends from scratch, and one backend change among them.
fn programming(c: &mut Criterion) {
    let pin_dir = format!("/sys/fs/bpf/keel-bench-crit-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&pin_dir);
    let mut dataplane =
        Dataplane::open(&Config::with_pin_dir(&pin_dir)).expect("open (run as root)");
    let services: Vec<_> = (0..10_000).map(service).collect();
    let mut group = c.benchmark_group("programming");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("sync_10000_services", |b| {
        b.iter(|| {
            dataplane.sync(services.clone()).check().expect("sync");
            dataplane.sync([]).check().expect("clear");
        })
    });
    dataplane.sync(services.clone()).check().expect("sync");
    let mut changed = services.clone();
    let one = &mut changed[5_000];
    let original = one.backends[0];
    let replacement = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 1), 8080);
    let mut flip = false;
    group.sample_size(100);
    group.bench_function("one_backend_change_at_10000", |b| {
        b.iter(|| {
            flip = !flip;
            changed[5_000].backends[0] = if flip { replacement } else { original };
            dataplane
                .set_backends(changed[5_000].frontend, &changed[5_000].backends)
                .expect("set")
        })
    });
    group.finish();
    drop(dataplane);
    let _ = std::fs::remove_dir_all(&pin_dir);
}

criterion_group!(benches, per_packet, maglev_tables, programming);
criterion_main!(benches);
