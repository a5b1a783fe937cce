//! KVM smoke tests on the local /dev/kvm: tiny real-mode guests, exact exits.
//!
//! They need /dev/kvm. Set FERRO_SKIP_KVM_TESTS=1 to skip them on a machine without it;
//! otherwise a missing /dev/kvm fails them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;

use hypervisor::{Hypervisor, Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CODE_ADDR: u64 = 0x1000;

fn hypervisor() -> Option<Hypervisor> {
    if std::env::var_os("FERRO_SKIP_KVM_TESTS").is_some() {
        return None;
    }
    Some(Hypervisor::open().expect("/dev/kvm must be usable (set FERRO_SKIP_KVM_TESTS=1 to skip)"))
}

/// A VM with 8 KiB of RAM at 0 holding `code` at 0x1000, and one real-mode vCPU starting
/// there. No irqchip, so `hlt` exits to userspace.
fn real_mode_guest(hv: &Hypervisor, code: &[u8]) -> (hypervisor::Vm, Vcpu) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
    mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
    let mut vm = hv.create_vm().unwrap();
    vm.register_memory(Arc::new(mem)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = hypervisor::StandardRegisters {
        rip: CODE_ADDR,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    (vm, vcpu)
}

#[derive(Debug, PartialEq)]
enum Seen {
    Out(u16, Vec<u8>),
    In(u16, usize),
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
    Hlt,
}

/// Runs until `hlt`, answering port reads with 0x42 and MMIO reads with 0x17.
fn run_to_hlt(vcpu: &mut Vcpu) -> Vec<Seen> {
    let mut seen = Vec::new();
    for _ in 0..100 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut { port, data } => seen.push(Seen::Out(port, data.to_vec())),
            VcpuExit::IoIn { port, data } => {
                seen.push(Seen::In(port, data.len()));
                data.fill(0x42);
            }
            VcpuExit::MmioWrite { addr, data } => seen.push(Seen::MmioWrite(addr, data.to_vec())),
            VcpuExit::MmioRead { addr, data } => {
                seen.push(Seen::MmioRead(addr, data.len()));
                data.fill(0x17);
            }
            VcpuExit::Hlt => {
                seen.push(Seen::Hlt);
                return seen;
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("guest did not halt: {seen:?}");
}

#[test]
fn port_writes_then_hlt() {
    let Some(hv) = hypervisor() else { return };
    // mov dx, 0x3f8; mov al, 'O'; out dx, al; mov al, 'K'; out dx, al; hlt
    let code = [0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xf4];
    let (_vm, mut vcpu) = real_mode_guest(&hv, &code);
    assert_eq!(
        run_to_hlt(&mut vcpu),
        vec![
            Seen::Out(0x3f8, vec![b'O']),
            Seen::Out(0x3f8, vec![b'K']),
            Seen::Hlt
        ]
    );
}

#[test]
fn port_read_result_reaches_the_guest() {
    let Some(hv) = hypervisor() else { return };
    // mov dx, 0x60; in al, dx; add al, 1; out dx, al; hlt
    let code = [0xba, 0x60, 0x00, 0xec, 0x04, 0x01, 0xee, 0xf4];
    let (_vm, mut vcpu) = real_mode_guest(&hv, &code);
    assert_eq!(
        run_to_hlt(&mut vcpu),
        vec![Seen::In(0x60, 1), Seen::Out(0x60, vec![0x43]), Seen::Hlt]
    );
    assert_eq!(vcpu.get_regs().unwrap().rax & 0xff, 0x43);
}

#[test]
fn unbacked_memory_is_mmio() {
    let Some(hv) = hypervisor() else { return };
    // mov al, 0x5a; mov [0x8000], al; mov bl, [0x8004]; mov al, bl; out 0x80, al; hlt
    let code = [
        0xb0, 0x5a, 0xa2, 0x00, 0x80, 0x8a, 0x1e, 0x04, 0x80, 0x88, 0xd8, 0xe6, 0x80, 0xf4,
    ];
    let (_vm, mut vcpu) = real_mode_guest(&hv, &code);
    assert_eq!(
        run_to_hlt(&mut vcpu),
        vec![
            Seen::MmioWrite(0x8000, vec![0x5a]),
            Seen::MmioRead(0x8004, 1),
            Seen::Out(0x80, vec![0x17]),
            Seen::Hlt
        ]
    );
}

#[test]
fn irqchip_pit_and_routing_can_be_created() {
    let Some(hv) = hypervisor() else { return };
    let vm = hv.create_vm().unwrap();
    vm.create_platform_devices().unwrap();
    vm.set_gsi_routing(&[
        hypervisor::IrqRoute::Ioapic { gsi: 0, pin: 2 },
        hypervisor::IrqRoute::Ioapic { gsi: 4, pin: 4 },
        hypervisor::IrqRoute::Msi {
            gsi: 24,
            address: 0xfee0_0000,
            data: 0x41,
        },
    ])
    .unwrap();
    let notify = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    vm.register_mmio_ioevent(&notify, 0xd000_0000).unwrap();
    vm.unregister_mmio_ioevent(&notify, 0xd000_0000).unwrap();
    let evt = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    vm.register_irqfd(&evt, 4).unwrap();
    vm.unregister_irqfd(&evt, 4).unwrap();
    assert!(!hv.supported_cpuid().unwrap().is_empty());
    assert!(hv.max_vcpus() >= 1);
}
