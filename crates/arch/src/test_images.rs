//! Hand-made kernel images that wrap a few bytes of machine code, for unit tests and KVM smoke
//! tests: a minimal bzImage (setup header + payload with the 64-bit entry at +0x200) and a
//! minimal ELF vmlinux with a PVH note. Enabled by the `test-images` feature.

use linux_loader::bootparam::setup_header;
use vm_memory::ByteValued;

const XLF_KERNEL_64: u16 = 1;
const SETUP_SECTS: u8 = 4;
const HLT: u8 = 0xf4;

/// A bzImage (boot protocol 2.15) whose 64-bit entry runs `code64`.
pub fn bzimage(code64: &[u8]) -> Vec<u8> {
    bzimage_with(code64, 0x020f, XLF_KERNEL_64)
}

/// A bzImage with a chosen boot protocol version and `xloadflags`.
pub fn bzimage_with(code64: &[u8], version: u16, xloadflags: u16) -> Vec<u8> {
    let setup_size = (usize::from(SETUP_SECTS) + 1) * 512;
    let header = setup_header {
        setup_sects: SETUP_SECTS,
        boot_flag: 0xaa55,
        header: 0x5372_6448,
        version,
        loadflags: 1, // LOADED_HIGH
        code32_start: 0x10_0000,
        initrd_addr_max: 0x7fff_ffff,
        kernel_alignment: 0x20_0000,
        xloadflags,
        cmdline_size: 2047,
        ..Default::default()
    };
    let mut image = vec![0u8; setup_size];
    let bytes = header.as_slice();
    image[0x1f1..0x1f1 + bytes.len()].copy_from_slice(bytes);
    // The 32-bit entry area is never used by Ferro; fill it with hlt.
    image.extend(std::iter::repeat_n(HLT, 0x200));
    image.extend_from_slice(code64);
    image
}

/// An ELF64 vmlinux loaded at physical `load_addr`, whose PVH entry (also `load_addr`) runs
/// `code32` in 32-bit protected mode.
pub fn pvh_elf(code32: &[u8], load_addr: u64) -> Vec<u8> {
    elf(code32, load_addr, true)
}

/// Like [`pvh_elf`] but without the PVH note.
pub fn elf_without_pvh_note(code: &[u8], load_addr: u64) -> Vec<u8> {
    elf(code, load_addr, false)
}

fn elf(code: &[u8], load_addr: u64, pvh_note: bool) -> Vec<u8> {
    const EHDR_SIZE: u64 = 64;
    const PHDR_SIZE: u64 = 56;
    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    let phnum: u16 = if pvh_note { 2 } else { 1 };
    let note = pvh_note_bytes(load_addr as u32);
    let note_offset = EHDR_SIZE + PHDR_SIZE * u64::from(phnum);
    let code_offset = note_offset + if pvh_note { note.len() as u64 } else { 0 };

    let mut out = Vec::new();
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, System V
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&load_addr.to_le_bytes()); // e_entry
    out.extend_from_slice(&EHDR_SIZE.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&phnum.to_le_bytes());
    out.extend_from_slice(&[0; 6]); // no sections
    push_phdr(&mut out, PT_LOAD, code_offset, load_addr, code.len() as u64);
    if pvh_note {
        push_phdr(&mut out, PT_NOTE, note_offset, 0, note.len() as u64);
        out.extend_from_slice(&note);
    }
    out.extend_from_slice(code);
    out
}

fn push_phdr(out: &mut Vec<u8>, kind: u32, offset: u64, addr: u64, size: u64) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&5u32.to_le_bytes()); // R+X
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    out.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    out.extend_from_slice(&size.to_le_bytes()); // p_filesz
    out.extend_from_slice(&size.to_le_bytes()); // p_memsz
    out.extend_from_slice(&4u64.to_le_bytes()); // p_align
}

/// XEN_ELFNOTE_PHYS32_ENTRY (type 18), owner "Xen", 8-byte descriptor as Linux emits it.
fn pvh_note_bytes(entry: u32) -> Vec<u8> {
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&8u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&u64::from(entry).to_le_bytes());
    note
}

/// Tiny x86 programs; every instruction used encodes the same in 32- and 64-bit mode.
pub mod asm {
    pub fn serial(text: &[u8]) -> Vec<u8> {
        let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
        for &byte in text {
            code.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, byte; out dx, al
        }
        code
    }

    /// Writes SLP_TYP=5 | SLP_EN to the ACPI sleep control register.
    pub const POWEROFF: &[u8] = &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee];
    /// Writes the reset value to the ACPI reset register.
    pub const ACPI_RESET: &[u8] = &[0x66, 0xba, 0x02, 0x06, 0xb0, 0x01, 0xee];
    /// Pulses the reset line through the keyboard controller.
    pub const I8042_RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64];
    /// `ud2` with an IDT too small for any vector: #UD, #DF, triple fault.
    pub const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];
    pub const HALT_FOREVER: &[u8] = &[0xf4, 0xeb, 0xfd];

    /// Prints the KVM signature from CPUID leaf 0x40000000 (EBX = "KVMK").
    pub fn print_cpuid_signature() -> Vec<u8> {
        let mut code = vec![0xb8, 0x00, 0x00, 0x00, 0x40]; // mov eax, 0x40000000
        code.extend_from_slice(&[0x0f, 0xa2]); // cpuid (clobbers edx)
        code.extend_from_slice(&[0x89, 0xd8]); // mov eax, ebx
        code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
        for _ in 0..3 {
            code.extend_from_slice(&[0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
        }
        code.push(0xee);
        code
    }

    /// Polls the ACPI GED event register (port 0x604) until the power-button bit is set.
    pub const WAIT_FOR_POWER_BUTTON: &[u8] = &[
        0x66, 0xba, 0x04, 0x06, // mov dx, 0x604
        0xec, 0xa8, 0x01, 0x74, 0xfb, // in al, dx; test al, 1; jz -5
    ];

    pub fn program(parts: &[&[u8]]) -> Vec<u8> {
        let mut code: Vec<u8> = parts.concat();
        code.extend_from_slice(HALT_FOREVER);
        code
    }
}
