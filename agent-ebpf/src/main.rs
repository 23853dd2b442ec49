//! strait's eBPF programs. Each entry point is a thin wrapper around a `try_*` function
//! returning `Result`, so every failure path is explicit rather than swallowed.
#![no_std]
#![no_main]

mod counter;
mod lb;
mod maps;
mod policy;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Dual license, GPL-compatible: the kernel refuses GPL-only helpers otherwise.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
