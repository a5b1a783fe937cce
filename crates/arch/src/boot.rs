//! Loading Linux into guest memory and describing the machine to it.
//!
//! Two entry protocols are supported:
//! - a **bzImage** is started at its 64-bit entry (load address + 0x200) in long mode, with
//!   `boot_params` (the "zero page") in RSI;
//! - an **ELF vmlinux** with a PVH note is started at that entry in 32-bit protected mode, with
//!   `hvm_start_info` in EBX.
//!
//! Both get the command line, the initramfs, the E820 map and the ACPI RSDP address.

use std::ffi::CString;
use std::io::{Read, Seek};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::e820;
use crate::gdt::{self, SegmentMode};
use crate::layout::{
    MemoryLayout, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::{bios, paging};

/// Errors while loading a kernel and writing its boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    #[error("not a Linux kernel: neither a bzImage (no \"HdrS\" setup header) nor an ELF vmlinux")]
    NotAKernel,
    #[error("the bzImage has no 64-bit entry point (boot protocol {0:#x}; 2.12 with XLF_KERNEL_64 is needed)")]
    No64BitEntry(u16),
    #[error("the ELF kernel has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY; build it with CONFIG_PVH=y)")]
    NoPvhEntry,
    #[error("cannot load the kernel into guest memory: {0}")]
    LoadKernel(loader::Error),
    #[error("cannot read the initramfs")]
    ReadInitrd(#[source] std::io::Error),
    #[error("the initramfs ({size} bytes) does not fit in guest memory between the kernel (ends at {kernel_end:#x}) and {limit:#x}")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("the kernel command line is {len} bytes long; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("the memory map has {0} entries, more than the boot protocol can carry")]
    TooManyMemoryMapEntries(usize),
    #[error("cannot write the {what} into guest memory")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

type Result<T> = std::result::Result<T, BootError>;

fn guest_mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::GuestMemory { what, source }
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit entry of a bzImage.
    Linux64(GuestAddress),
    /// PVH entry of an ELF vmlinux.
    Pvh(GuestAddress),
}

impl EntryPoint {
    /// The CPU mode the entry point expects.
    pub fn segment_mode(&self) -> SegmentMode {
        match self {
            EntryPoint::Linux64(_) => SegmentMode::Long,
            EntryPoint::Pvh(_) => SegmentMode::Protected32,
        }
    }
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// First byte after the kernel image.
    pub kernel_end: u64,
    /// The bzImage setup header (None for ELF kernels).
    pub setup_header: Option<setup_header>,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// Offset of a bzImage's 64-bit entry from its load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1 << 0;
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
const BOOT_PROTOCOL_2_12: u16 = 0x020c;
/// x86 Linux's COMMAND_LINE_SIZE, used when the kernel does not tell (PVH).
const DEFAULT_CMDLINE_SIZE: usize = 2048;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
const PVH_START_INFO_MAGIC: u32 = 0x336e_c578;
const PVH_START_INFO_VERSION: u32 = 1;

/// Loads a bzImage or an ELF vmlinux (format detected from its first bytes).
pub fn load_kernel<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let mut magic = [0u8; 4];
    image.rewind().map_err(BootError::ReadKernel)?;
    let is_elf = match image.read_exact(&mut magic) {
        Ok(()) => magic == ELF_MAGIC,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(BootError::ReadKernel(e)),
    };
    image.rewind().map_err(BootError::ReadKernel)?;
    if is_elf {
        load_elf(mem, image)
    } else {
        load_bzimage(mem, image)
    }
}

fn load_elf<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let loaded = Elf::load(mem, None, image, Some(HIGH_RAM_START)).map_err(|e| match e {
        loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber) => BootError::NotAKernel,
        other => BootError::LoadKernel(other),
    })?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            entry: EntryPoint::Pvh(entry),
            kernel_end: loaded.kernel_end,
            setup_header: None,
        }),
        _ => Err(BootError::NoPvhEntry),
    }
}

fn load_bzimage<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let loaded = BzImage::load(mem, None, image, Some(HIGH_RAM_START)).map_err(|e| match e {
        loader::Error::Bzimage(
            loader::bzimage::Error::InvalidBzImage
            | loader::bzimage::Error::ReadBzImageHeader
            | loader::bzimage::Error::SeekBzImageHeader
            | loader::bzimage::Error::Underflow,
        ) => BootError::NotAKernel,
        other => BootError::LoadKernel(other),
    })?;
    let header = loaded.setup_header.ok_or(BootError::NotAKernel)?;
    let version = header.version;
    if version < BOOT_PROTOCOL_2_12 || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry(version));
    }
    Ok(LoadedKernel {
        entry: EntryPoint::Linux64(loaded.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET)),
        kernel_end: loaded.kernel_end,
        setup_header: Some(header),
    })
}

/// Where the initramfs was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Highest address (exclusive) the kernel can reach its initramfs at.
fn initrd_limit(kernel: &LoadedKernel, memory: &MemoryLayout) -> u64 {
    let low_end = memory.low_ram_end();
    match kernel.setup_header {
        Some(h) if h.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G == 0 => {
            low_end.min(u64::from(h.initrd_addr_max) + 1)
        }
        _ => low_end,
    }
}

/// Copies `size` bytes of initramfs from `file` to the top of the memory the kernel can reach.
pub fn load_initrd<M, F>(
    mem: &M,
    kernel: &LoadedKernel,
    memory: &MemoryLayout,
    file: &mut F,
    size: u64,
) -> Result<InitrdPlacement>
where
    M: GuestMemoryBackend,
    F: ReadVolatile,
{
    let limit = initrd_limit(kernel, memory);
    let too_large = BootError::InitrdTooLarge {
        size,
        kernel_end: kernel.kernel_end,
        limit,
    };
    let addr = match limit.checked_sub(size) {
        Some(top) => top & !0xfff,
        None => return Err(too_large),
    };
    if addr < kernel.kernel_end {
        return Err(too_large);
    }
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        size,
        kernel_end: kernel.kernel_end,
        limit,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(io) => BootError::ReadInitrd(io),
            vm_memory::GuestMemoryError::PartialBuffer {
                expected,
                completed,
            } => BootError::ReadInitrd(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file ended after {completed} of {expected} bytes"),
            )),
            other => BootError::GuestMemory {
                what: "initramfs",
                source: other,
            },
        })?;
    Ok(InitrdPlacement {
        addr: GuestAddress(addr),
        size,
    })
}

/// What the boot information describes.
#[derive(Debug, Clone)]
pub struct BootInfo<'a> {
    pub kernel: &'a LoadedKernel,
    pub cmdline: &'a str,
    pub initrd: Option<InitrdPlacement>,
    pub memory: &'a MemoryLayout,
    pub rsdp: GuestAddress,
}

/// Largest command line (without the NUL) the loaded kernel accepts.
pub fn max_cmdline_len(kernel: &LoadedKernel) -> usize {
    let declared = kernel
        .setup_header
        .map(|h| h.cmdline_size as usize)
        .filter(|&size| size > 0)
        .unwrap_or(DEFAULT_CMDLINE_SIZE);
    declared.min(CMDLINE_MAX_SIZE - 1)
}

/// Writes command line, descriptor tables, page tables and the protocol's boot structure.
pub fn write_boot_info<M: GuestMemoryBackend>(mem: &M, info: &BootInfo<'_>) -> Result<()> {
    let max = max_cmdline_len(info.kernel);
    if info.cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: info.cmdline.len(),
            max,
        });
    }
    let cmdline = CString::new(info.cmdline).map_err(|_| BootError::CmdlineNul)?;
    mem.write_slice(cmdline.as_bytes_with_nul(), CMDLINE_START)
        .map_err(guest_mem_err("command line"))?;
    gdt::write_boot_descriptor_tables(mem, info.kernel.entry.segment_mode())
        .map_err(guest_mem_err("GDT"))?;
    paging::write_identity_page_tables(mem).map_err(guest_mem_err("page tables"))?;
    bios::write_reset_vector(mem).map_err(guest_mem_err("reset vector"))?;
    match info.kernel.setup_header {
        Some(header) => write_zero_page(mem, info, header),
        None => write_pvh_start_info(mem, info),
    }
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    info: &BootInfo<'_>,
    header: setup_header,
) -> Result<()> {
    let mut params = boot_params {
        hdr: header,
        acpi_rsdp_addr: info.rsdp.0,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = info.cmdline.len() as u32 + 1;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
    }
    if let Some(initrd) = info.initrd {
        // The initramfs sits below the 32-bit MMIO hole, so both fit in 32 bits.
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820::memory_map(info.memory);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyMemoryMapEntries(map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, ZERO_PAGE_START), mem)
        .map_err(BootError::BootParams)
}

fn write_pvh_start_info<M: GuestMemoryBackend>(mem: &M, info: &BootInfo<'_>) -> Result<()> {
    let map = e820::memory_map(info.memory);
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyMemoryMapEntries(map.len()));
    }
    let mut start_info = hvm_start_info {
        magic: PVH_START_INFO_MAGIC,
        version: PVH_START_INFO_VERSION,
        cmdline_paddr: CMDLINE_START.0,
        rsdp_paddr: info.rsdp.0,
        memmap_paddr: PVH_MEMMAP_START.0,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new(&start_info, PVH_INFO_START);
    if let Some(initrd) = info.initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START.0;
        params = BootParams::new(&start_info, PVH_INFO_START);
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: initrd.addr.0,
                size: initrd.size,
                ..Default::default()
            }],
            PVH_MODLIST_START,
        );
    }
    params.set_sections(&memmap, PVH_MEMMAP_START);
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_images;
    use crate::GuestMemoryMmap;
    use std::io::Cursor;

    const MEM: u64 = 256 << 20;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(MEM).unwrap()
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn load(image: Vec<u8>) -> Result<LoadedKernel> {
        load_kernel(&memory(), &mut Cursor::new(image))
    }

    #[test]
    fn bzimage_enters_at_load_address_plus_0x200() {
        let mem = memory();
        let image = test_images::bzimage(&[0xf4]);
        let kernel = load_kernel(&mem, &mut Cursor::new(image)).unwrap();
        assert_eq!(kernel.entry, EntryPoint::Linux64(GuestAddress(0x10_0200)));
        let code: u8 = mem.read_obj(GuestAddress(0x10_0200)).unwrap();
        assert_eq!(code, 0xf4);
        assert!(kernel.setup_header.is_some());
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let image = test_images::bzimage_with(&[0xf4], 0x020c, 0);
        assert!(matches!(load(image), Err(BootError::No64BitEntry(0x020c))));
        let old = test_images::bzimage_with(&[0xf4], 0x0206, 1);
        assert!(matches!(load(old), Err(BootError::No64BitEntry(0x0206))));
    }

    #[test]
    fn garbage_and_empty_files_are_not_kernels() {
        assert!(matches!(load(vec![0x55; 8192]), Err(BootError::NotAKernel)));
        assert!(matches!(load(Vec::new()), Err(BootError::NotAKernel)));
        assert!(matches!(
            load(b"#!/bin/sh".to_vec()),
            Err(BootError::NotAKernel)
        ));
    }

    #[test]
    fn elf_with_pvh_note_enters_at_the_note_address() {
        let kernel = load(test_images::pvh_elf(&[0xf4], 0x100_0000)).unwrap();
        assert_eq!(kernel.entry, EntryPoint::Pvh(GuestAddress(0x100_0000)));
        assert!(kernel.setup_header.is_none());
        assert_eq!(kernel.kernel_end, 0x100_0001);
    }

    #[test]
    fn elf_without_pvh_note_is_refused() {
        let image = test_images::elf_without_pvh_note(&[0xf4], 0x100_0000);
        assert!(matches!(load(image), Err(BootError::NoPvhEntry)));
    }

    #[test]
    fn elf_outside_guest_memory_is_an_error_not_a_panic() {
        let image = test_images::pvh_elf(&[0xf4], 0x7000_0000);
        assert!(matches!(load(image), Err(BootError::LoadKernel(_))));
    }

    #[test]
    fn initrd_goes_to_the_top_of_reachable_memory() {
        let mem = memory();
        let kernel = load_kernel(&mem, &mut Cursor::new(test_images::bzimage(&[0xf4]))).unwrap();
        let data = vec![0xabu8; 10_000];
        let placed = load_initrd(
            &mem,
            &kernel,
            &layout(),
            &mut Cursor::new(&data),
            data.len() as u64,
        )
        .unwrap();
        assert_eq!(placed.addr.0 % 4096, 0);
        assert!(placed.addr.0 + 10_000 <= MEM);
        assert!(MEM - placed.addr.0 < 10_000 + 4096);
        let mut back = vec![0u8; 10_000];
        mem.read_slice(&mut back, placed.addr).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let mem = memory();
        let kernel = load_kernel(&mem, &mut Cursor::new(test_images::bzimage(&[0xf4]))).unwrap();
        let err = load_initrd(&mem, &kernel, &layout(), &mut Cursor::new(vec![]), MEM).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }));
        let err =
            load_initrd(&mem, &kernel, &layout(), &mut Cursor::new(vec![]), MEM * 4).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }));
    }

    #[test]
    fn short_initrd_file_is_a_read_error() {
        let mem = memory();
        let kernel = load_kernel(&mem, &mut Cursor::new(test_images::bzimage(&[0xf4]))).unwrap();
        let err = load_initrd(
            &mem,
            &kernel,
            &layout(),
            &mut Cursor::new(vec![1u8; 10]),
            4096,
        );
        assert!(matches!(err, Err(BootError::ReadInitrd(_))));
    }

    #[test]
    fn zero_page_describes_cmdline_initrd_memory_and_acpi() {
        let mem = memory();
        let kernel = load_kernel(&mem, &mut Cursor::new(test_images::bzimage(&[0xf4]))).unwrap();
        let initrd = InitrdPlacement {
            addr: GuestAddress(0x800_0000),
            size: 0x1234,
        };
        let info = BootInfo {
            kernel: &kernel,
            cmdline: "console=ttyS0 quiet",
            initrd: Some(initrd),
            memory: &layout(),
            rsdp: GuestAddress(0xe0000),
        };
        write_boot_info(&mem, &info).unwrap();
        let params: boot_params = mem.read_obj(ZERO_PAGE_START).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START.0 as u32);
        assert_eq!({ hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        let map = e820::memory_map(&layout());
        assert_eq!(params.e820_entries as usize, map.len());
        for (got, want) in params.e820_table.iter().zip(&map) {
            assert_eq!(
                ({ got.addr }, { got.size }, { got.r#type }),
                (want.addr, want.size, want.kind)
            );
        }
        let mut cmdline = vec![0u8; 20];
        mem.read_slice(&mut cmdline, CMDLINE_START).unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn cmdline_longer_than_the_kernel_accepts_is_refused() {
        let mem = memory();
        let kernel = load_kernel(&mem, &mut Cursor::new(test_images::bzimage(&[0xf4]))).unwrap();
        let long = "x".repeat(max_cmdline_len(&kernel) + 1);
        let info = BootInfo {
            kernel: &kernel,
            cmdline: &long,
            initrd: None,
            memory: &layout(),
            rsdp: GuestAddress(0xe0000),
        };
        assert!(matches!(
            write_boot_info(&mem, &info),
            Err(BootError::CmdlineTooLong { .. })
        ));
        let nul = BootInfo {
            cmdline: "a\0b",
            ..info
        };
        assert!(matches!(
            write_boot_info(&mem, &nul),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn pvh_start_info_describes_cmdline_initrd_and_memory() {
        let mem = memory();
        let image = test_images::pvh_elf(&[0xf4], 0x100_0000);
        let kernel = load_kernel(&mem, &mut Cursor::new(image)).unwrap();
        let initrd = InitrdPlacement {
            addr: GuestAddress(0x800_0000),
            size: 0x1000,
        };
        let info = BootInfo {
            kernel: &kernel,
            cmdline: "console=ttyS0",
            initrd: Some(initrd),
            memory: &layout(),
            rsdp: GuestAddress(0xe0000),
        };
        write_boot_info(&mem, &info).unwrap();
        let start: hvm_start_info = mem.read_obj(PVH_INFO_START).unwrap();
        assert_eq!(start.magic, PVH_START_INFO_MAGIC);
        assert_eq!(start.cmdline_paddr, CMDLINE_START.0);
        assert_eq!(start.rsdp_paddr, 0xe0000);
        assert_eq!(start.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(start.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x800_0000, 0x1000));
        let map = e820::memory_map(&layout());
        assert_eq!(start.memmap_entries as usize, map.len());
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                start.memmap_paddr + 24 * (map.len() as u64 - 1),
            ))
            .unwrap();
        let want = map[map.len() - 1];
        assert_eq!(
            (last.addr, last.size, last.type_),
            (want.addr, want.size, want.kind)
        );
    }
}
