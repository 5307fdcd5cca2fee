//! The same benchmark with mimalloc as the global allocator for every contender: shows what
//! the queues cost without glibc malloc's arena lock, which dominates when each message's
//! payload is allocated on one thread and freed on another.
//!
//! `cargo bench -p spindle-memory --bench throughput_mimalloc`

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "throughput.rs"]
mod throughput;

fn main() {
    throughput::main();
}
