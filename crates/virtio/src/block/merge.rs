//! Request merging, as QEMU's virtio-blk does: reads (or writes) that arrive together and
//! cover adjacent sectors run as one system call. A 1 MiB guest read arrives as two requests
//! (the guest splits it at `seg_max` segments); merged, it is one preadv.
//!
//! Only the concurrent path merges (raw images). Every request still gets its own status: if
//! the merged transfer fails, each request is run alone to learn whose part failed.

use std::sync::Arc;

use virtio_queue::DescriptorChain;

use super::{parse_request, request_buffers, request_type, Executor, Request, SECTOR_SIZE};
use crate::GuestMemory;

/// Largest merged transfer.
const MAX_MERGED_BYTES: u64 = 4 << 20;
/// Most buffers in a merged transfer (the kernel's IOV_MAX).
const MAX_MERGED_SEGMENTS: usize = 1024;

type Chain = DescriptorChain<Arc<GuestMemory>>;

/// Where a read or write request's data goes: its kind, first byte and length.
fn extent(chain: &Chain, mem: &GuestMemory) -> Option<(u32, u64, u64, usize)> {
    let request = request_buffers(chain.clone(), mem)
        .ok()
        .and_then(|b| parse_request(b).ok())?;
    let (data, segments) = data_of(&request)?;
    let start = request.sector.checked_mul(SECTOR_SIZE)?;
    // The guest picks the sector: a request ending past u64 stays alone (no overflow below).
    start.checked_add(data)?;
    Some((request.kind, start, data, segments))
}

/// The data length and buffer count of a read or write.
fn data_of(request: &Request<'_>) -> Option<(u64, usize)> {
    let buffers = match request.kind {
        request_type::IN => &request.output,
        request_type::OUT => &request.input,
        _ => return None,
    };
    let len = block::slices_len(buffers);
    (len > 0 && len.is_multiple_of(SECTOR_SIZE)).then_some((len, buffers.len()))
}

/// Splits `chains` (in the driver's order) into runs that can be served as one transfer.
pub fn group(chains: Vec<Chain>, mem: &GuestMemory) -> Vec<Vec<Chain>> {
    if chains.len() < 2 {
        // Nothing to merge: spare a lone request (queue depth 1) the extra parse.
        return chains.into_iter().map(|chain| vec![chain]).collect();
    }
    let mut groups: Vec<Vec<Chain>> = Vec::new();
    // Kind, next byte, bytes and buffers of the open group.
    let mut open: Option<(u32, u64, u64, usize)> = None;
    for chain in chains {
        let this = extent(&chain, mem);
        let joins = match (open, this) {
            (Some((kind, next, bytes, segments)), Some((k, start, len, n))) => {
                k == kind
                    && start == next
                    && bytes.saturating_add(len) <= MAX_MERGED_BYTES
                    && segments + n <= MAX_MERGED_SEGMENTS
            }
            _ => false,
        };
        match (joins, this, groups.last_mut()) {
            (true, Some((_, _, len, n)), Some(last)) => {
                last.push(chain);
                open = open.map(|(kind, next, bytes, segments)| {
                    (kind, next + len, bytes + len, segments + n)
                });
            }
            _ => {
                groups.push(vec![chain]);
                open = this.map(|(kind, start, len, n)| (kind, start + len, len, n));
            }
        }
    }
    groups
}

impl Executor {
    /// Serves `chains` (in the driver's order) as the device's concurrent path does, grouped
    /// and merged, one group after another; returns each chain's head and the bytes written
    /// into it, in order. For tests and fuzzing: the device spreads groups over threads.
    pub fn serve_batch(&self, chains: Vec<Chain>, mem: &GuestMemory) -> Vec<(u16, u32)> {
        group(chains, mem)
            .into_iter()
            .flat_map(|chains| self.serve_group(chains, mem))
            .collect()
    }

    /// Serves a group from [`group`]; returns each chain's head and the bytes written into it.
    pub fn serve_group(&self, chains: Vec<Chain>, mem: &GuestMemory) -> Vec<(u16, u32)> {
        if chains.len() > 1 {
            if let Some(done) = self.serve_merged(&chains, mem) {
                return done;
            }
        }
        chains
            .into_iter()
            .map(|chain| {
                let head = chain.head_index();
                (head, self.serve(chain, mem))
            })
            .collect()
    }

    /// One transfer for the whole group; None (nothing done) if the requests no longer line up
    /// or the transfer failed, so each runs alone.
    fn serve_merged(&self, chains: &[Chain], mem: &GuestMemory) -> Option<Vec<(u16, u32)>> {
        let mut requests = Vec::with_capacity(chains.len());
        for chain in chains {
            let buffers = request_buffers(chain.clone(), mem).ok()?;
            requests.push((chain.head_index(), parse_request(buffers).ok()?));
        }
        let kind = requests.first()?.1.kind;
        let mut data = Vec::new();
        let mut next = requests.first()?.1.sector;
        for (_, request) in &requests {
            let (len, _) = data_of(request)?;
            if request.kind != kind || request.sector != next {
                return None;
            }
            next = next.checked_add(len / SECTOR_SIZE)?;
            data.extend_from_slice(match kind {
                request_type::IN => &request.output,
                _ => &request.input,
            });
        }
        let first = requests.first()?.1.sector;
        let moved = match kind {
            request_type::IN => self.read_data(first, &data),
            _ => self.write_data(first, &data),
        };
        moved.ok()?;
        Some(
            requests
                .iter()
                .map(|(head, request)| {
                    self.count(request, &Ok(0));
                    request.status.copy_from(&[super::status::OK]);
                    let written = match kind {
                        request_type::IN => block::slices_len(&request.output) as u32,
                        _ => 0,
                    };
                    (*head, written.saturating_add(1))
                })
                .collect(),
        )
    }
}
