//! One boot of the virtual machine: KVM VM, guest memory, platform devices, loaded kernel and
//! vCPUs (the control loop that runs it is in [`crate::control`]).

use std::fs::File;
use std::io::{Seek, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use api::{ConsoleKind, RunnableConfig, VmConfig, VmState};
use arch::layout::{irqs, ports, MemoryLayout};
use arch::GuestMemoryMmap;
use devices::bus::{Bus, BusDevice};
use devices::ged::GedEvents;
use devices::serial::Serial;
use devices::PowerEvents;
use hypervisor::{Hypervisor, Vcpu, Vm};
use virtio::queue_watch::QueueWatch;
use vmm_sys_util::eventfd::EventFd;

use crate::error::Error;
use crate::faults::Faults;
use crate::interrupts::InterruptRouter;
use crate::memory::create_guest_memory;
use crate::pci_devices::PciBuilder;
use crate::stats::Stats;
use crate::vcpu::{self, HostCpu};

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
        let paths: Vec<_> = self.images.iter().map(|(_, c)| &c.source).collect();
        f.debug_struct("Disks").field("paths", &paths).finish()
    }
}

impl Disks {
    pub fn open(config: &RunnableConfig) -> Result<Self, Error> {
        let mut images = Vec::new();
        for (disk, path) in config.disk_paths() {
            let format = disk
                .format
                .as_deref()
                .map(str::parse::<block::Format>)
                .transpose()
                .map_err(|message| {
                    Error::Config(api::ConfigError::Disk {
                        path: path.display().to_string(),
                        source: api::options::OptionError::Invalid {
                            key: "format".into(),
                            message,
                        },
                    })
                })?;
            if format.is_none() {
                tracing::warn!(
                    "disk {}: no format given, so it is probed from its first bytes, which is \
                     unsafe for an image a guest has written (a probed raw disk refuses guest \
                     writes that would make it look like another format); give format=raw or \
                     format=qcow2",
                    path.display()
                );
            }
            let options = block::ImageOptions {
                read_only: disk.readonly,
                format,
                backing_dir: disk.backing_dir.clone(),
            };
            let image = block::open_with(path, &options).map_err(|source| Error::Disk {
                path: path.to_path_buf(),
                source,
            })?;
            images.push((Arc::new(Mutex::new(image)), disk.clone()));
        }
        Ok(Disks { images })
    }

    /// Fresh devices on the shared images, for one boot: the disk's `num_queues` request
    /// queues, or one per vCPU (QEMU's default).
    fn devices(&self, stats: &Stats, cpus: u16) -> Vec<virtio::block::Block> {
        self.images
            .iter()
            .enumerate()
            .map(|(i, (image, c))| {
                virtio::block::Block::new(
                    image.clone(),
                    c.readonly,
                    c.serial.as_deref().unwrap_or(""),
                    stats.device(&format!("block{i}"), virtio::block::new_counters),
                )
                .with_queues(c.num_queues.unwrap_or(cpus))
            })
            .collect()
    }
}

/// The TAP devices, opened once for all boots (a TAP Ferro created lives as long as Ferro):
/// one queue per queue pair of each NIC.
pub(crate) struct Nets {
    taps: Vec<(Vec<Arc<virtio::net::Tap>>, api::MacAddress)>,
}

impl std::fmt::Debug for Nets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self
            .taps
            .iter()
            .map(|(t, _)| {
                format!(
                    "{} ({} queues)",
                    t.first().map_or("", |q| q.name()),
                    t.len()
                )
            })
            .collect();
        f.debug_struct("Nets").field("taps", &names).finish()
    }
}

impl Nets {
    pub fn open(config: &RunnableConfig) -> Result<Self, Error> {
        let mut taps = Vec::new();
        for (net, tap) in config.nic_taps() {
            // One pair per vCPU unless the user chose; an existing single-queue TAP then
            // gets one pair, while a count the user chose must be met.
            let pairs = net
                .queue_pairs
                .map_or(config.cpus as usize, usize::from)
                .min(usize::from(api::net::MAX_NET_QUEUE_PAIRS));
            let fewer_ok = net.queue_pairs.is_none();
            let queues = virtio::net::Tap::open_queues(tap, pairs, fewer_ok).map_err(|source| {
                Error::Net {
                    tap: tap.to_string(),
                    source,
                }
            })?;
            if queues[0].created() {
                tracing::info!("created TAP device {tap} ({} queues)", queues.len());
            }
            taps.push((
                queues.into_iter().map(Arc::new).collect(),
                net.mac.unwrap_or_else(api::MacAddress::random),
            ));
        }
        Ok(Nets { taps })
    }

    fn devices(&self, stats: &Stats) -> Result<Vec<virtio::net::Net>, Error> {
        self.taps
            .iter()
            .enumerate()
            .map(|(i, (queues, mac))| {
                let counters = stats.device(&format!("net{i}"), virtio::net::new_counters);
                virtio::net::Net::new(queues.clone(), mac.0, counters).map_err(|source| {
                    Error::NetDevice {
                        tap: queues.first().map_or("", |q| q.name()).to_string(),
                        source,
                    }
                })
            })
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
    /// A client of the control API stopped the VM.
    Stopped,
}

/// A fully assembled VM, ready to run once.
pub(crate) struct Machine {
    pub(crate) state: VmState,
    /// Keeps the VM (and with it guest memory and the PCI devices' routes) alive while the
    /// vCPUs run.
    pub(crate) vm: Arc<Vm>,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) console_input: ConsoleTarget,
    /// COM1, for the stall report.
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// Each virtio device's name (`block0`) and its queues' watches, for the stall report.
    pub(crate) virtio_queues: Vec<(String, Vec<Arc<QueueWatch>>)>,
    /// Readable when the guest device took all input handed to it.
    pub(crate) input_drained: EventFd,
    pub(crate) power: PowerEvents,
    /// Raises ACPI events (the power button).
    pub(crate) ged: GedEvents,
    /// The guest's kvm-clock when it was paused, restored on resume.
    pub(crate) paused_clock: Option<u64>,
    pub(crate) faults: Faults,
}

/// The guest device that receives the console's input.
pub(crate) enum ConsoleTarget {
    Serial(Arc<Mutex<Serial>>),
    Hvc(Arc<virtio::console::ConsoleInput>),
}

fn io_err(e: std::io::Error) -> Error {
    Error::Devices(e)
}

fn shared<T: BusDevice + 'static>(device: T) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(device))
}

/// What the VM keeps across boots: its boot files, disk images and TAP devices.
#[derive(Debug)]
pub(crate) struct Backends {
    pub files: BootFiles,
    pub disks: Disks,
    pub nets: Nets,
}

impl Backends {
    /// The process limits for a VMM with these backends (see [`sandbox::ProcessLimits`]).
    pub fn limits(&self, config: &VmConfig, core_dumps: bool) -> sandbox::ProcessLimits {
        let devices = self.disks.images.len() + config.nets.len() + 2; // rng, console
        let images: Vec<(u64, u64)> = self
            .disks
            .images
            .iter()
            .map(|(image, disk)| {
                let now = disk
                    .path()
                    .and_then(|path| std::fs::metadata(path).ok())
                    .map_or(0, |m| m.len());
                let size = image.lock().map_or(0, |image| image.size());
                (now, size)
            })
            .collect();
        sandbox::ProcessLimits::for_vmm(devices as u64, &images, core_dumps)
    }

    pub fn open(config: &RunnableConfig) -> Result<Self, Error> {
        Ok(Backends {
            files: BootFiles::open(config)?,
            disks: Disks::open(config)?,
            nets: Nets::open(config)?,
        })
    }
}

impl Machine {
    /// Builds the VM for `config`, with the guest's serial output going to `console_out`.
    pub fn build(
        hv: &Hypervisor,
        host: &HostCpu,
        config: &VmConfig,
        backends: &mut Backends,
        stats: &Stats,
        console_out: Box<dyn Write + Send>,
        faults: Faults,
    ) -> Result<Self, Error> {
        let Backends { files, disks, nets } = backends;
        let mut vm = hv.create_vm()?;
        vm.create_platform_devices()?;
        // The one place the guest's memory map is derived from its size.
        let layout = MemoryLayout::new(config.memory.0).map_err(|source| Error::MemoryLayout {
            size: config.memory,
            source,
        })?;
        let memory = Arc::new(create_guest_memory(&layout)?);
        vm.register_memory(memory.clone())?;
        let vm = Arc::new(vm);
        let interrupts = Arc::new(InterruptRouter::new(vm.clone())?);

        let power = PowerEvents::new().map_err(io_err)?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
        if !faults.mute_serial_irq {
            vm.register_irqfd(&serial_irq, irqs::COM1)?;
        }
        let input_drained = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
        let (serial_out, console_device, console_input) = match config.console {
            ConsoleKind::Serial => (console_out, None, None),
            ConsoleKind::Hvc => {
                let input = Arc::new(
                    virtio::console::ConsoleInput::new(input_drained.try_clone().map_err(io_err)?)
                        .map_err(io_err)?,
                );
                let device = virtio::console::Console::new(
                    console_out,
                    input.clone(),
                    stats.device("console0", virtio::console::new_counters),
                );
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
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err)?;
        vm.register_irqfd(&ged_irq, irqs::GED)?;
        let (ged_register, ged) = devices::ged::new(ged_irq);
        let pio = Self::port_bus(&power, serial.clone(), &layout)?;
        pio.insert(
            shared(ged_register),
            ports::ACPI_GED.into(),
            ports::ACPI_GED_SIZE.into(),
        )?;
        let mmio = Arc::new(Bus::new());
        let mut pci = PciBuilder::new(&pio, &mmio, &power, &layout)?;
        let cpus = u16::try_from(config.cpus).unwrap_or(api::vm_config::MAX_DISK_QUEUES);
        let mut virtio_queues = Vec::new();
        for (i, disk) in disks.devices(stats, cpus).into_iter().enumerate() {
            let watches = pci.add_virtio(Box::new(disk), &memory, &interrupts, &vm)?;
            virtio_queues.push((format!("block{i}"), watches));
        }
        for (i, net) in nets.devices(stats)?.into_iter().enumerate() {
            let watches = pci.add_virtio(Box::new(net), &memory, &interrupts, &vm)?;
            virtio_queues.push((format!("net{i}"), watches));
        }
        if config.rng {
            let counters = stats.device("rng0", virtio::rng::new_counters);
            let rng = virtio::rng::Rng::new(counters, entropy_limit(config));
            let watches = pci.add_virtio(Box::new(rng), &memory, &interrupts, &vm)?;
            virtio_queues.push(("rng0".into(), watches));
        }
        if let Some(console) = console_device {
            let watches = pci.add_virtio(Box::new(console), &memory, &interrupts, &vm)?;
            virtio_queues.push(("console0".into(), watches));
        }

        let entry = Self::load_guest(&memory, &layout, config, files)?;
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
                None => ConsoleTarget::Serial(serial.clone()),
            },
            serial,
            virtio_queues,
            input_drained,
            power,
            ged,
            paused_clock: None,
            faults,
        })
    }

    fn port_bus(
        power: &PowerEvents,
        serial: Arc<Mutex<Serial>>,
        layout: &MemoryLayout,
    ) -> Result<Bus, Error> {
        let clone = || power.try_clone().map_err(io_err);
        let pio = Bus::new();
        pio.insert(serial, ports::COM1.into(), ports::COM_SIZE.into())?;
        pio.insert(
            shared(devices::i8042::I8042::new(clone()?)),
            ports::I8042.into(),
            ports::I8042_SIZE.into(),
        )?;
        pio.insert(
            shared(devices::cmos::Cmos::new(
                layout.low_ram_end(),
                layout.high_ram_size(),
            )),
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
        layout: &MemoryLayout,
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
                let placed = arch::boot::load_initrd(memory, &kernel, layout, file, size).map_err(
                    |source| Error::Boot {
                        path: path.clone(),
                        source,
                    },
                )?;
                Some(placed)
            }
            None => None,
        };
        let rsdp = arch::acpi::write_acpi_tables(
            memory,
            &arch::acpi::AcpiConfig {
                cpus: config.cpus,
                memory: *layout,
            },
        )?;
        let info = arch::boot::BootInfo {
            kernel: &kernel,
            cmdline: &config.cmdline,
            initrd,
            memory: layout,
            rsdp,
        };
        arch::boot::write_boot_info(memory, &info).map_err(|source| Error::Boot {
            path: files.kernel_path.clone(),
            source,
        })?;
        Ok(kernel.entry)
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

/// virtio-rng's budget from the configuration (defaults applied).
fn entropy_limit(config: &VmConfig) -> virtio::rng::EntropyLimit {
    let options = config.rng_options();
    let period = std::time::Duration::from_millis(u64::from(options.period_ms()));
    virtio::rng::EntropyLimit::per_second(options.bytes_per_sec(), period)
}
