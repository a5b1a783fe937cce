//! KVM smoke test of the reset-vector stub: a real-mode vCPU started where Linux's "BIOS
//! reboot" jumps (F000:FFF0) must write the ACPI reset register and halt.
//!
//! Needs /dev/kvm; set FERRO_SKIP_KVM_TESTS=1 to skip.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;

use hypervisor::{Hypervisor, VcpuExit};
use vm_memory::GuestAddress;

#[test]
fn reset_vector_writes_the_acpi_reset_register() {
    if std::env::var_os("FERRO_SKIP_KVM_TESTS").is_some() {
        return;
    }
    let hv = Hypervisor::open().expect("/dev/kvm must be usable (FERRO_SKIP_KVM_TESTS=1 skips)");
    let mem = arch::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    arch::bios::write_reset_vector(&mem).unwrap();
    let mut vm = hv.create_vm().unwrap();
    vm.register_memory(Arc::new(mem)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.selector = 0xf000;
    sregs.cs.base = 0xf0000;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&hypervisor::StandardRegisters {
        rip: 0xfff0,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    match vcpu.run().unwrap() {
        VcpuExit::IoOut { port, data } => {
            assert_eq!(port, arch::layout::ports::ACPI_RESET);
            assert_eq!(data, [arch::layout::ports::ACPI_RESET_VALUE]);
        }
        other => panic!("expected the reset write, got {other:?}"),
    }
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
}
