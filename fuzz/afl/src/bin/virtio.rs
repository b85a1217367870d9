//! AFL harness of molt_fuzz::virtio.

fn main() {
    afl::fuzz!(|data: &[u8]| molt_fuzz::virtio(data));
}
