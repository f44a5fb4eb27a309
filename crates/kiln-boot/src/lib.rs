//! kiln-boot
