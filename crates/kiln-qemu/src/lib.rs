//! kiln-qemu
