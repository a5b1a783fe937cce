//! Kernel images are user input: whatever the bytes, loading them and writing the boot
//! information must end in Ok or an error, never a panic or an absurd allocation.
#![no_main]

use std::io::Cursor;

use arch::boot::{load_initrd, load_kernel, write_boot_info, BootInfo};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

const MEMORY: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = arch::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY as usize)]) else {
        return;
    };
    let Ok(layout) = arch::layout::MemoryLayout::new(MEMORY) else {
        return;
    };
    // The first byte picks the command line length, the rest is the image.
    let Some((&cmdline_len, image)) = data.split_first() else {
        return;
    };
    let Ok(kernel) = load_kernel(&mem, &mut Cursor::new(image)) else {
        return;
    };
    let initrd = load_initrd(
        &mem,
        &kernel,
        &layout,
        &mut Cursor::new(image),
        image.len() as u64,
    )
    .ok();
    let cmdline = "x".repeat(usize::from(cmdline_len) * 16);
    let info = BootInfo {
        kernel: &kernel,
        cmdline: &cmdline,
        initrd,
        memory: &layout,
        rsdp: arch::layout::ACPI_START,
    };
    let _ = write_boot_info(&mem, &info);
});
