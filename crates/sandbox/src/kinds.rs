//! The VMM's thread kinds and the system calls each may make once confined. A thread is
//! confined when it starts (or, for the main thread, after setup), before it touches anything
//! the guest wrote. Lists are kept to what the code on that thread calls; a call outside them is
//! a bug or an attack, and ends the VMM with a report naming it.

use crate::allowed::{Allowed, Arg};
use crate::ioctls as io;
use crate::Error;

/// What a thread does, and so which filter it runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: builds the machine at each boot and runs the control loop.
    Vmm,
    /// Runs `KVM_RUN` and the devices the guest reaches by port I/O and MMIO.
    Vcpu,
    /// Starts every other thread (see `spawner`); its filter is the union of theirs.
    Spawner,
    /// The control API's acceptor and connection threads.
    Api,
    /// The console's reader, hub and client threads.
    Console,
    /// A virtio-blk worker (it also runs I/O jobs itself when the pool is full).
    Block,
    /// A thread of the virtio-blk I/O pool.
    BlockIo,
    /// A virtio-net queue pair worker.
    Net,
    /// The virtio-net control queue worker (TAP queue switching, offloads).
    NetControl,
    /// The virtio-rng worker.
    Rng,
    /// The virtio-console worker.
    VirtioConsole,
}

impl ThreadKind {
    /// Every kind, in declaration order (its index is the kind's number).
    pub const ALL: [ThreadKind; 11] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Spawner,
        ThreadKind::Api,
        ThreadKind::Console,
        ThreadKind::Block,
        ThreadKind::BlockIo,
        ThreadKind::Net,
        ThreadKind::NetControl,
        ThreadKind::Rng,
        ThreadKind::VirtioConsole,
    ];

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Spawner => "spawner",
            ThreadKind::Api => "api",
            ThreadKind::Console => "console",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::BlockIo => "virtio-blk-io",
            ThreadKind::Net => "virtio-net",
            ThreadKind::NetControl => "virtio-net-ctl",
            ThreadKind::Rng => "virtio-rng",
            ThreadKind::VirtioConsole => "virtio-console",
        }
    }

    /// The system calls this kind may make in a process whose id is `pid`.
    pub fn allowed(self, pid: u32) -> Result<Allowed, Error> {
        let base = base(pid)?;
        let kind = match self {
            ThreadKind::Vmm => vmm()?,
            ThreadKind::Vcpu => vcpu()?,
            ThreadKind::Spawner => return spawner(pid),
            ThreadKind::Api => api(),
            ThreadKind::Console => console(),
            ThreadKind::Block => worker().union(&block_io()),
            ThreadKind::BlockIo => block_io(),
            ThreadKind::Net => worker().always(&[libc::SYS_readv]),
            ThreadKind::NetControl => {
                worker().ioctls(&[io::TUNSETQUEUE, io::TUNGETIFF, io::TUNSETOFFLOAD])?
            }
            // the refill timer between budget periods
            ThreadKind::Rng => {
                worker().always(&[libc::SYS_timerfd_settime, libc::SYS_timerfd_gettime])
            }
            // the console's output to the console socket's clients
            ThreadKind::VirtioConsole => worker().always(&[libc::SYS_sendto]),
        };
        Ok(base.union(&kind))
    }
}

/// What every thread may do: memory, locks, time, writing to descriptors it holds, ending,
/// signals to its own process (the vCPU kick, the violation report), and the log file's
/// rotation (any thread may log).
fn base(pid: u32) -> Result<Allowed, Error> {
    use libc::*;
    let log_file = (O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC) as u64;
    Allowed::default()
        .always(&[
            SYS_brk,
            SYS_mmap,
            SYS_munmap,
            SYS_mremap,
            SYS_mprotect,
            SYS_madvise,
            SYS_futex,
            SYS_sched_yield,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_gettimeofday,
            SYS_getrandom,
            SYS_write,
            SYS_writev,
            SYS_pwrite64,
            SYS_close,
            SYS_rt_sigreturn,
            SYS_rt_sigprocmask,
            SYS_sigaltstack,
            SYS_restart_syscall,
            SYS_getpid,
            SYS_gettid,
            SYS_exit,
            SYS_exit_group,
            // the log's rotation: rename the old files, make a new one, point stderr at it
            SYS_rename,
            SYS_renameat,
            SYS_renameat2,
            SYS_dup2,
            SYS_dup3,
            SYS_statx,
            SYS_fstat,
            SYS_newfstatat,
        ])
        .when(SYS_openat, &[Arg::Is(2, log_file)])?
        .when(SYS_tgkill, &[Arg::Is(0, u64::from(pid))])
}

/// A device worker: waits in epoll on queue notifications, its backend and its stop event.
fn worker() -> Allowed {
    use libc::*;
    Allowed::default().always(&[
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_epoll_ctl,
        SYS_read,
        SYS_fcntl,
    ])
}

/// Disk I/O on files opened at setup.
fn block_io() -> Allowed {
    use libc::*;
    Allowed::default().always(&[
        SYS_pread64,
        SYS_preadv,
        SYS_preadv2,
        SYS_pwritev,
        SYS_pwritev2,
        SYS_lseek,
        SYS_fsync,
        SYS_fdatasync,
        SYS_fallocate,
        SYS_ftruncate,
    ])
}

/// The vCPU: `KVM_RUN` and the state reads the stall report makes; and what the devices do on
/// an MMIO or port write: interrupt routes and eventfds when the driver programs MSI-X or
/// starts a device (whose worker the spawner starts), TAP offloads and queues.
fn vcpu() -> Result<Allowed, Error> {
    use libc::*;
    Allowed::default()
        .always(&[
            SYS_read,
            SYS_eventfd2,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_fcntl,
            // the serial console's output to the console socket's clients
            SYS_sendto,
            // virtio-rng's refill timer, made when the driver enables the device
            SYS_timerfd_create,
        ])
        .ioctls(&[
            io::KVM_RUN,
            io::KVM_GET_REGS,
            io::KVM_GET_SREGS,
            io::KVM_GET_LAPIC,
            io::KVM_GET_MP_STATE,
            io::KVM_GET_VCPU_EVENTS,
            io::KVM_IRQ_LINE,
            io::KVM_SIGNAL_MSI,
            io::KVM_SET_GSI_ROUTING,
            io::KVM_IRQFD,
            io::KVM_IOEVENTFD,
            io::KVM_SET_USER_MEMORY_REGION,
            io::TUNSETOFFLOAD,
            io::TUNSETQUEUE,
            io::TUNGETIFF,
            io::TUNSETVNETHDRSZ,
        ])
}

/// The main thread: each boot builds the machine again (KVM objects, guest memory, the kernel
/// and initrd read again), and the control loop reads the guest's clock and interrupt
/// controllers, kicks vCPU threads, and restores the terminal at the end.
fn vmm() -> Result<Allowed, Error> {
    use libc::*;
    Allowed::default()
        .always(&[
            SYS_read,
            SYS_pread64,
            SYS_readv,
            SYS_lseek,
            SYS_eventfd2,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_fcntl,
            SYS_unlink,
            SYS_unlinkat,
            SYS_shutdown,
        ])
        .when(
            SYS_openat,
            &[Arg::Masked(2, O_ACCMODE as u64, O_RDONLY as u64)],
        )?
        .when(SYS_ioctl, &[Arg::Masked(1, io::TYPE_MASK, io::KVMIO << 8)])?
        .ioctls(&io::TERMINAL)?
        .ioctls(&[
            io::TUNSETOFFLOAD,
            io::TUNSETQUEUE,
            io::TUNGETIFF,
            io::TUNSETVNETHDRSZ,
        ])
}

/// A server on Unix sockets: accept, read and answer, wait in poll or epoll.
fn socket_server() -> Allowed {
    use libc::*;
    Allowed::default().always(&[
        SYS_accept4,
        SYS_read,
        SYS_recvfrom,
        SYS_sendto,
        SYS_setsockopt,
        SYS_shutdown,
        SYS_poll,
        SYS_ppoll,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_fcntl,
    ])
}

/// The API: requests are read here and go to the main thread.
fn api() -> Allowed {
    socket_server()
}

/// The console: standard input, the console socket's clients, pipes between them.
fn console() -> Allowed {
    socket_server().always(&[libc::SYS_eventfd2])
}

/// The spawner: starting threads (never processes: `clone` must carry `CLONE_THREAD`, and
/// `clone3`, whose flags a filter cannot see, is answered ENOSYS by a filter of its own so
/// the C library falls back to `clone`), and what its children need until they install their
/// own filter on top of this one, which they cannot widen: everything any kind may do.
fn spawner(pid: u32) -> Result<Allowed, Error> {
    use libc::*;
    let thread = CLONE_THREAD as u64;
    let mut all = base(pid)?
        .always(&[
            SYS_clone3,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_prctl,
            SYS_seccomp,
            SYS_sched_getaffinity,
        ])
        .when(SYS_clone, &[Arg::Masked(0, thread, thread)])?;
    for kind in ThreadKind::ALL {
        if kind != ThreadKind::Spawner {
            all = all.union(&kind.allowed(pid)?);
        }
    }
    Ok(all)
}
