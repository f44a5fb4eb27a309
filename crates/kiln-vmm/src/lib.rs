//! kiln-vmm
