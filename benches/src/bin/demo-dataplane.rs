//! `demo-dataplane`: the eBPF data plane carrying real traffic between network namespaces (see
//! `benches::demo`). Run as root; `cargo xtask demo` builds and runs it.

fn main() -> anyhow::Result<()> {
    benches::demo::demo()
}
