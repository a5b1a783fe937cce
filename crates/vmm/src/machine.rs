//! One boot of the virtual machine: KVM VM, guest memory, platform devices, loaded kernel and
//! vCPUs, and the control loop that runs while the guest does.

use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};

use api::{ConsoleKind, VmConfig};
use arch::layout::{irqs, ports};
use arch::GuestMemoryMmap;
use devices::bus::{lock, Bus, BusDevice};
use devices::serial::Serial;
use devices::PowerEvents;
use hypervisor::{Hypervisor, Vcpu, Vm};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::console::Console;
use crate::error::Error;
use crate::interrupts::InterruptRouter;
use crate::memory::create_guest_memory;
use crate::pci_devices::PciBuilder;
use crate::signals::TerminationSignals;
use crate::state::VmState;
use crate::vcpu::{self, HostCpu, VcpuRunner};

/// The kernel and initramfs, opened once and re-read at every boot.
#[derive(Debug)]
pub(crate) struct BootFiles {
    kernel: File,
    kernel_path: PathBuf,
    initrd: Option<(File, PathBuf)>,
}

impl BootFiles {
    pub fn open(config: &VmConfig) -> Result<Self, Error> {
        let kernel = File::open(&config.kernel).map_err(|source| Error::OpenKernel {
            path: config.kernel.clone(),
            source,
        })?;
        let initrd = match &config.initrd {
            Some(path) => {
                let file = File::open(path).map_err(|source| Error::OpenInitrd {
                    path: path.clone(),
                    source,
                })?;
                Some((file, path.clone()))
            }
            None => None,
        };
        Ok(BootFiles {
            kernel,
            kernel_path: config.kernel.clone(),
            initrd,
        })
    }
}

/// The disk images, opened (and locked) once for all boots of the VM: a reset rebuilds the
/// machine but keeps the images.
pub(crate) struct Disks {
    images: Vec<(virtio::block::SharedDisk, api::DiskConfig)>,
}

impl std::fmt::Debug for Disks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<_> = self.images.iter().map(|(_, c)| &c.path).collect();
        f.debug_struct("Disks").field("paths", &paths).finish()
    }
}

impl Disks {
    pub fn open(config: &VmConfig) -> Result<Self, Error> {
        let mut images = Vec::new();
        for disk in &config.disks {
            let format = disk
                .format
                .as_deref()
                .map(str::parse::<block::Format>)
                .transpose()
                .map_err(|message| {
                    Error::Config(api::ConfigError::Disk {
                        path: disk.path.display().to_string(),
                        source: api::options::OptionError::Invalid {
                            key: "format".into(),
                            message,
                        },
                    })
                })?;
            let image =
                block::open(&disk.path, disk.readonly, format).map_err(|source| Error::Disk {
                    path: disk.path.clone(),
                    source,
                })?;
            images.push((Arc::new(Mutex::new(image)), disk.clone()));
        }
        Ok(Disks { images })
    }

    /// Fresh devices on the shared images, for one boot.
    fn devices(&self) -> Vec<virtio::block::Block> {
        self.images
            .iter()
            .map(|(image, c)| {
                virtio::block::Block::new(
                    image.clone(),
                    c.readonly,
                    c.serial.as_deref().unwrap_or(""),
                )
            })
            .collect()
    }
}

/// The TAP devices, opened once for all boots (a TAP Ferro created lives as long as Ferro).
pub(crate) struct Nets {
    taps: Vec<(Arc<virtio::net::Tap>, api::MacAddress)>,
}

impl std::fmt::Debug for Nets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.taps.iter().map(|(t, _)| t.name()).collect();
        f.debug_struct("Nets").field("taps", &names).finish()
    }
}

impl Nets {
    pub fn open(config: &VmConfig) -> Result<Self, Error> {
        let mut taps = Vec::new();
        for net in &config.nets {
            let tap = virtio::net::Tap::open(&net.tap).map_err(|source| Error::Net {
                tap: net.tap.clone(),
                source,
            })?;
            if tap.created() {
                tracing::info!("created TAP device {}", net.tap);
            }
            taps.push((
                Arc::new(tap),
                net.mac.unwrap_or_else(api::MacAddress::random),
            ));
        }
        Ok(Nets { taps })
    }

    fn devices(&self) -> Vec<virtio::net::Net> {
        self.taps
            .iter()
            .map(|(tap, mac)| virtio::net::Net::new(tap.clone(), mac.0))
            .collect()
    }
}

/// Why a boot ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    PowerOff,
    Reset,
    Quit,
    Signal(i32),
}

/// A fully assembled VM, ready to run once.
pub(crate) struct Machine {
    state: VmState,
    /// Keeps the VM (and with it guest memory and the PCI devices' routes) alive while the
    /// vCPUs run.
    vm: Arc<Vm>,
    vcpus: Vec<Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    console_input: ConsoleTarget,
    /// Readable when the guest device took all input handed to it.
    input_drained: EventFd,
    power: PowerEvents,
}

/// The guest device that receives the console's input.
enum ConsoleTarget {
    Serial(Arc<Mutex<Serial>>),
    Hvc(Arc<virtio::console::ConsoleInput>),
}

fn io_err(e: std::io::Error) -> Error {
    Error::Devices(e)
}

fn shared<T: BusDevice + 'static>(device: T) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(device))
}

impl Machine {
    /// Builds the VM for `config`, with the guest's serial output going to `console_out`.
    pub fn build(
        hv: &Hypervisor,
        host: &HostCpu,
        config: &VmConfig,
        files: &mut BootFiles,
        disks: &Disks,
        nets: &Nets,
        console_out: Box<dyn Write + Send>,
    ) -> Result<Self, Error> {
        let mut vm = hv.create_vm()?;
        vm.create_platform_devices()?;
        let memory = Arc::new(create_guest_memory(config.memory)?);
        vm.register_memory(memory.clone())?;
        let vm = Arc::new(vm);
        let interrupts = Arc::new(InterruptRouter::new(vm.clone())?);

        let power = PowerEvents::new().map_err(io_err)?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
        vm.register_irqfd(&serial_irq, irqs::COM1)?;
        let input_drained = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
        let (serial_out, console_device, console_input) = match config.console {
            ConsoleKind::Serial => (console_out, None, None),
            ConsoleKind::Hvc => {
                let input = Arc::new(
                    virtio::console::ConsoleInput::new(input_drained.try_clone().map_err(io_err)?)
                        .map_err(io_err)?,
                );
                let device = virtio::console::Console::new(console_out, input.clone());
                // The UART stays for the guest to probe, but is connected to nothing.
                (
                    Box::new(std::io::sink()) as Box<dyn Write + Send>,
                    Some(device),
                    Some(input),
                )
            }
        };
        let serial = Arc::new(Mutex::new(Serial::new(
            serial_irq,
            input_drained.try_clone().map_err(io_err)?,
            serial_out,
        )));
        let pio = Self::port_bus(&power, serial.clone(), config)?;
        let mmio = Arc::new(Bus::new());
        let mut pci = PciBuilder::new(&pio, &mmio, &power, config.memory.0)?;
        for disk in disks.devices() {
            pci.add_virtio(Box::new(disk), &memory, &interrupts, &vm)?;
        }
        for net in nets.devices() {
            pci.add_virtio(Box::new(net), &memory, &interrupts, &vm)?;
        }
        if config.rng {
            pci.add_virtio(Box::new(virtio::rng::Rng::new()), &memory, &interrupts, &vm)?;
        }
        if let Some(console) = console_device {
            pci.add_virtio(Box::new(console), &memory, &interrupts, &vm)?;
        }

        let entry = Self::load_guest(&memory, config, files)?;
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for id in 0..config.cpus {
            let vcpu = vm.create_vcpu(id)?;
            vcpu::configure(&vcpu, host, config.cpus, (id == 0).then_some(&entry))?;
            vcpus.push(vcpu);
        }
        Ok(Machine {
            state: VmState::Created,
            vm,
            vcpus,
            pio: Arc::new(pio),
            mmio,
            console_input: match console_input {
                Some(input) => ConsoleTarget::Hvc(input),
                None => ConsoleTarget::Serial(serial),
            },
            input_drained,
            power,
        })
    }

    fn port_bus(
        power: &PowerEvents,
        serial: Arc<Mutex<Serial>>,
        config: &VmConfig,
    ) -> Result<Bus, Error> {
        let ram = config.memory.0;
        let below_4g = arch::layout::low_ram_end(ram);
        let clone = || power.try_clone().map_err(io_err);
        let pio = Bus::new();
        pio.insert(serial, ports::COM1.into(), ports::COM_SIZE.into())?;
        pio.insert(
            shared(devices::i8042::I8042::new(clone()?)),
            ports::I8042.into(),
            ports::I8042_SIZE.into(),
        )?;
        pio.insert(
            shared(devices::cmos::Cmos::new(below_4g, ram - below_4g)),
            ports::CMOS.into(),
            ports::CMOS_SIZE.into(),
        )?;
        pio.insert(
            shared(devices::acpi_pm::AcpiPm::new(
                clone()?,
                arch::acpi::SLEEP_TYPE_S5,
                ports::ACPI_RESET_VALUE,
            )),
            ports::ACPI_PM.into(),
            ports::ACPI_PM_SIZE.into(),
        )?;
        Ok(pio)
    }

    /// Loads kernel and initramfs and writes ACPI tables and boot information.
    fn load_guest(
        memory: &GuestMemoryMmap,
        config: &VmConfig,
        files: &mut BootFiles,
    ) -> Result<arch::boot::EntryPoint, Error> {
        let kernel_err = |source| Error::Boot {
            path: files.kernel_path.clone(),
            source,
        };
        let kernel = arch::boot::load_kernel(memory, &mut files.kernel).map_err(kernel_err)?;
        let initrd = match &mut files.initrd {
            Some((file, path)) => {
                let read_err = |source| Error::OpenInitrd {
                    path: path.clone(),
                    source,
                };
                let size = file.metadata().map_err(read_err)?.len();
                // Every boot reads the file again from its start.
                file.rewind().map_err(read_err)?;
                let placed = arch::boot::load_initrd(memory, &kernel, config.memory.0, file, size)
                    .map_err(|source| Error::Boot {
                        path: path.clone(),
                        source,
                    })?;
                Some(placed)
            }
            None => None,
        };
        let rsdp = arch::acpi::write_acpi_tables(
            memory,
            &arch::acpi::AcpiConfig {
                cpus: config.cpus,
                memory_size: config.memory.0,
            },
        )?;
        let info = arch::boot::BootInfo {
            kernel: &kernel,
            cmdline: &config.cmdline,
            initrd,
            memory_size: config.memory.0,
            rsdp,
        };
        arch::boot::write_boot_info(memory, &info).map_err(|source| Error::Boot {
            path: files.kernel_path.clone(),
            source,
        })?;
        Ok(kernel.entry)
    }

    /// Runs the guest until it powers off, resets, fails, or the user or a signal stops it.
    pub fn run(
        mut self,
        console: &mut Console,
        signals: &TerminationSignals,
    ) -> Result<StopReason, Error> {
        self.transition(VmState::Running);
        let stop = Arc::new(AtomicBool::new(false));
        let (failures_tx, failures) = mpsc::channel();
        let failure_event = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
        let mut handles = Vec::new();
        let mut result = Ok(StopReason::PowerOff);
        for vcpu in std::mem::take(&mut self.vcpus) {
            let runner = VcpuRunner {
                vcpu,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                power: self.power.try_clone().map_err(io_err)?,
                stop: stop.clone(),
                failures: failures_tx.clone(),
                failure_event: failure_event.try_clone().map_err(io_err)?,
            };
            match runner.spawn() {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if result.is_ok() {
            result = self.control_loop(console, signals, &failures, &failure_event);
        }
        tracing::debug!("boot ends: {result:?}");
        self.transition(VmState::Stopping);
        vcpu::stop_all(&stop, handles);
        self.transition(VmState::Stopped);
        tracing::debug!("all vCPUs stopped");
        // A vCPU that failed while others were being stopped still explains the end.
        match (result, failures.try_recv()) {
            (Ok(StopReason::Reset | StopReason::PowerOff), Ok(failure)) => Err(failure),
            (result, _) => result,
        }
    }

    fn transition(&mut self, to: VmState) {
        if let Err(e) = self.state.transition(to) {
            tracing::error!("{e}");
        }
    }

    fn feed_console(&self, console: &mut Console) {
        match &self.console_input {
            ConsoleTarget::Serial(serial) => {
                console.deliver(|bytes| lock(serial).enqueue_input(bytes))
            }
            ConsoleTarget::Hvc(input) => console.deliver(|bytes| input.enqueue(bytes)),
        }
    }

    fn control_loop(
        &self,
        console: &mut Console,
        signals: &TerminationSignals,
        failures: &Receiver<Error>,
        failure_event: &EventFd,
    ) -> Result<StopReason, Error> {
        const SHUTDOWN: u64 = 0;
        const RESET: u64 = 1;
        const VCPU_FAILED: u64 = 2;
        const INPUT: u64 = 3;
        const INPUT_DRAINED: u64 = 4;
        const QUIT: u64 = 5;
        const SIGNAL: u64 = 6;
        let epoll = Epoll::new().map_err(Error::ControlLoop)?;
        let sources: [(RawFd, u64); 7] = [
            (self.power.shutdown.as_raw_fd(), SHUTDOWN),
            (self.power.reset.as_raw_fd(), RESET),
            (failure_event.as_raw_fd(), VCPU_FAILED),
            (console.input_ready_fd(), INPUT),
            (self.input_drained.as_raw_fd(), INPUT_DRAINED),
            (console.quit_fd(), QUIT),
            (signals.as_raw_fd(), SIGNAL),
        ];
        for (fd, token) in sources {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(Error::ControlLoop)?;
        }
        // Input typed during a previous boot is still waiting.
        self.feed_console(console);
        let mut events = vec![EpollEvent::default(); sources.len()];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::ControlLoop(e)),
            };
            for event in &events[..n] {
                match event.data() {
                    SHUTDOWN => return Ok(StopReason::PowerOff),
                    RESET => return Ok(StopReason::Reset),
                    VCPU_FAILED => {
                        let _ = failure_event.read();
                        if let Ok(failure) = failures.try_recv() {
                            return Err(failure);
                        }
                    }
                    INPUT => {
                        console.collect_input();
                        self.feed_console(console);
                    }
                    INPUT_DRAINED => {
                        let _ = self.input_drained.read();
                        self.feed_console(console);
                    }
                    QUIT if console.quit_requested() => return Ok(StopReason::Quit),
                    SIGNAL => {
                        if let Some(signal) = signals.read().map_err(Error::ControlLoop)? {
                            return Ok(StopReason::Signal(signal));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("state", &self.state)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}
