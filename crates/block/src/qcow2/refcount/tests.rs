//! Tests of the refcount engine: refcount blocks and the table, allocation, and the rule that
//! no cluster holding metadata is handed out or freed (the entry encoding is tested in
//! `refblock`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::*;
use crate::qcow2::metadata::is_refused_update;
use crate::qcow2::testing::{
    check_clean, host_of, new_image, read, read_bytes, read_u64, refcount as image_refcount,
    reopen, write,
};
use crate::qcow2::{header, read_header, Mapping, Qcow2Image, OFFSET_MASK};
use crate::DiskImage;

/// A file laid out as: header (cluster 0), a one-cluster refcount table (cluster 1) naming one
/// refcount block (cluster 2) that counts clusters 0..3 in `1 << order`-bit entries.
fn refcount_file(cluster_bits: u32, order: u32) -> File {
    let cluster = 1u64 << cluster_bits;
    let file = tempfile::tempfile().unwrap();
    file.write_all_at(&(2 * cluster).to_be_bytes(), cluster)
        .unwrap();
    let mut block = vec![0u8; cluster as usize];
    for c in 0..3 {
        encode(1 << order, &mut block, c, 1);
    }
    file.write_all_at(&block, 2 * cluster).unwrap();
    file
}

fn load(file: &File, cluster_bits: u32, order: u32) -> Refcounts {
    Refcounts::load(file, cluster_bits, order, 1 << cluster_bits, 1).unwrap()
}

#[test]
fn every_width_counts_up_to_its_maximum_and_refuses_more() {
    for order in 0..=6u32 {
        let file = refcount_file(9, order);
        let mut refcounts = load(&file, 9, order);
        let max = refcounts.max_refcount();
        assert_eq!(max, u64::MAX >> (64 - (1u32 << order)), "order {order}");
        for cluster in 0..3 {
            assert_eq!(refcounts.get(&file, cluster).unwrap(), 1, "order {order}");
        }
        let (offset, moves) = refcounts.allocate(&file, 1, "test data").unwrap();
        assert_eq!((offset, moves), (3 * 512, vec![]), "order {order}");
        refcounts.set(&file, 3, max).unwrap();
        assert_eq!(refcounts.get(&file, 3).unwrap(), max, "order {order}");
        if order < 6 {
            assert!(refcounts.set(&file, 3, max + 1).is_err(), "order {order}");
        }
        assert!(refcounts.adjust(&file, 3, 1).is_err(), "order {order}");
        assert_eq!(refcounts.get(&file, 3).unwrap(), max, "order {order}");
        // Written through, and only the one entry.
        let mut again = load(&file, 9, order);
        assert_eq!(again.get(&file, 3).unwrap(), max, "order {order}");
        assert_eq!(again.get(&file, 2).unwrap(), 1, "order {order}");
        assert_eq!(again.get(&file, 4).unwrap(), 0, "order {order}");
        refcounts.set(&file, 3, 0).unwrap();
        assert!(refcounts.adjust(&file, 3, -1).is_err(), "order {order}");
        assert_eq!(refcounts.get(&file, 3).unwrap(), 0, "order {order}");
    }
}

#[test]
fn a_new_refcount_block_goes_in_the_first_cluster_it_counts() {
    // 512-byte clusters, 16-bit refcounts: a block counts 256 clusters.
    let file = refcount_file(9, 4);
    let mut refcounts = load(&file, 9, 4);
    assert_eq!(refcounts.set(&file, 300, 1).unwrap(), None);
    assert_eq!(refcounts.table_entry(1), 256 * 512);
    assert_eq!(read_u64(&file, 512 + 8), 256 * 512, "the table on disk");
    let map = refcounts.metadata();
    assert_eq!(map.find(256..257), Some((Structure::RefcountBlock, 256)));
    let mut again = load(&file, 9, 4);
    assert_eq!(again.get(&file, 256).unwrap(), 1, "the block counts itself");
    assert_eq!(again.get(&file, 300).unwrap(), 1);
    assert_eq!(again.get(&file, 299).unwrap(), 0);
}

#[test]
fn the_block_that_counts_the_header_is_never_made_up() {
    let file = tempfile::tempfile().unwrap();
    file.set_len(2 * 512).unwrap();
    let mut refcounts = load(&file, 9, 4);
    assert_eq!(refcounts.get(&file, 5).unwrap(), 0);
    let err = refcounts.set(&file, 5, 1).unwrap_err();
    assert!(
        err.to_string().contains("no refcount block for its header"),
        "{err}"
    );
    assert_eq!(read_u64(&file, 512), 0);
}

#[test]
fn hostile_refcount_tables_are_refused_on_load() {
    // Table entries (4 KiB clusters; the table is cluster 1, its real block cluster 2).
    let cases: [(&[u64], &str); 4] = [
        (&[2 * 4096 + 512], "not aligned"),
        (&[100 * 4096], "past the end"),
        (&[4096], "overlap"),
        (&[2 * 4096, 2 * 4096], "overlap"),
    ];
    for (entries, expected) in cases {
        let file = refcount_file(12, 4);
        for (i, entry) in (0u64..).zip(entries) {
            file.write_all_at(&entry.to_be_bytes(), 4096 + i * 8)
                .unwrap();
        }
        let err = Refcounts::load(&file, 12, 4, 4096, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains(expected), "{entries:?}: {err}");
    }
    let file = refcount_file(12, 4);
    let err = Refcounts::load(&file, 12, 4, 4096, 100).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
}

#[test]
fn clusters_holding_metadata_are_never_freed() {
    let file = refcount_file(9, 4);
    let mut refcounts = load(&file, 9, 4);
    for cluster in 0..3 {
        let err = refcounts.set(&file, cluster, 0).unwrap_err();
        assert!(is_refused_update(&err), "{err}");
        assert!(err.to_string().contains("refusing to free"), "{err}");
        assert_eq!(refcounts.get(&file, cluster).unwrap(), 1);
    }
    // Metadata the image records counts as well as the allocator's own.
    refcounts
        .metadata_mut()
        .add_extent(3 * 512, 512, Structure::L1Table)
        .unwrap();
    refcounts.set(&file, 3, 1).unwrap();
    assert!(refcounts.adjust(&file, 3, -1).is_err());
    assert_eq!(refcounts.get(&file, 3).unwrap(), 1);
}

#[test]
fn allocation_takes_the_first_free_run_and_refuses_metadata_counted_free() {
    let file = refcount_file(9, 4);
    let mut refcounts = load(&file, 9, 4);
    assert!(refcounts.allocate(&file, 0, "nothing").is_err());
    refcounts.set(&file, 3, 1).unwrap();
    refcounts.set(&file, 5, 1).unwrap();
    assert_eq!(refcounts.allocate(&file, 1, "test").unwrap().0, 4 * 512);
    assert_eq!(refcounts.allocate(&file, 2, "test").unwrap().0, 6 * 512);
    assert_eq!(refcounts.get(&file, 7).unwrap(), 1);
    // The next free cluster holds metadata the refcounts do not count.
    refcounts
        .metadata_mut()
        .add_extent(8 * 512, 512, Structure::SnapshotTable)
        .unwrap();
    let err = refcounts.allocate(&file, 1, "guest data").unwrap_err();
    assert!(is_refused_update(&err), "{err}");
    assert!(err.to_string().contains("the snapshot table"), "{err}");
    assert_eq!(refcounts.get(&file, 8).unwrap(), 0, "nothing was counted");
}

#[test]
fn a_run_longer_than_a_block_counts_gets_its_blocks_after_it() {
    // 256 clusters per block: 600 clusters from cluster 3 need blocks for two more ranges,
    // placed after the run so that it stays whole.
    let file = refcount_file(9, 4);
    let mut refcounts = load(&file, 9, 4);
    let (offset, moves) = refcounts.allocate(&file, 600, "test").unwrap();
    assert_eq!((offset, moves), (3 * 512, vec![]));
    assert_eq!(refcounts.table_entry(1), 603 * 512);
    assert_eq!(refcounts.table_entry(2), 604 * 512);
    let mut again = load(&file, 9, 4);
    for cluster in [3, 255, 256, 511, 512, 602, 603, 604] {
        assert_eq!(again.get(&file, cluster).unwrap(), 1, "cluster {cluster}");
    }
    assert_eq!(again.get(&file, 605).unwrap(), 0);
    let map = again.metadata();
    assert_eq!(map.find(3..603), None);
    assert_eq!(map.find(603..605), Some((Structure::RefcountBlock, 603)));
}

#[test]
fn a_refcount_table_past_its_maximum_size_is_an_error() {
    let file = refcount_file(9, 4);
    let len = file.metadata().unwrap().len();
    let mut refcounts = load(&file, 9, 4);
    let err = refcounts.set(&file, 1 << 40, 1).unwrap_err();
    assert!(err.to_string().contains("maximum size"), "{err}");
    assert_eq!(file.metadata().unwrap().len(), len, "nothing was written");
}

#[test]
fn refcounts_beyond_the_table_grow_it_and_the_old_one_is_freed() {
    // 512-byte clusters: a block counts 256 clusters, the one-cluster table 64 blocks.
    let (file, mut image) = new_image(9, 64 << 20);
    let old_table = image.header.refcount_table_offset;
    let far = 64 * 256 + 10;
    let moved = image.refcounts.set(&image.file, far, 1).unwrap().unwrap();
    assert_ne!(moved.offset, old_table);
    let header = read_header(&file).unwrap();
    assert_eq!(header.refcount_table_offset, moved.offset);
    assert_eq!(header.refcount_table_clusters, moved.clusters);
    assert_eq!(image.refcounts.get(&image.file, far).unwrap(), 1);
    // The old table is free, the new one and its blocks are counted and recorded.
    assert_eq!(image.refcounts.get(&image.file, old_table >> 9).unwrap(), 0);
    assert_eq!(
        image.refcounts.get(&image.file, moved.offset >> 9).unwrap(),
        1
    );
    let map = image.refcounts.metadata();
    assert_eq!(map.find(map.clusters(old_table, 512)), None);
    assert_eq!(
        map.find(map.clusters(moved.offset, 512)),
        Some((Structure::RefcountTable, moved.offset >> 9))
    );
    let new_block = image.refcounts.table_entry(64);
    assert_eq!(
        map.find(map.clusters(new_block, 1)).map(|(what, _)| what),
        Some(Structure::RefcountBlock)
    );
    // Decrements below zero are refused, not wrapped.
    assert!(image
        .refcounts
        .adjust(&image.file, old_table >> 9, -1)
        .is_err());
}

#[test]
fn allocation_takes_free_clusters_in_order_and_reuses_freed_ones() {
    let (file, mut image) = new_image(12, 1 << 20);
    let end = file.metadata().unwrap().len();
    let a = image.allocate(1, "test data").unwrap();
    assert_eq!(a, end, "the first free cluster follows the metadata");
    let b = image.allocate(3, "test data").unwrap();
    assert_eq!(b, a + 4096);
    for offset in [a, b, b + 4096, b + 8192] {
        assert_eq!(image_refcount(&mut image, offset), 1);
    }
    image
        .release(Mapping::Data {
            host: a,
            owned: true,
        })
        .unwrap();
    assert_eq!(image_refcount(&mut image, a), 0);
    assert_eq!(
        image.allocate(1, "test data").unwrap(),
        a,
        "a freed cluster is reused"
    );
    image
        .release(Mapping::Data {
            host: a,
            owned: true,
        })
        .unwrap();
    // A run does not fit in a one-cluster hole.
    let run = image.allocate(2, "test data").unwrap();
    assert_eq!(run, b + 3 * 4096);
}

#[test]
fn a_write_longer_than_a_refcount_block_counts_takes_one_run() {
    // 512-byte clusters: a refcount block counts 256 of them, and a 1 MiB write needs 2048
    // consecutive new ones. New blocks used to go at the start of each range they count,
    // cutting every run: the allocator searched forever (found by the qcow2_writes target).
    let (file, image) = new_image(9, 4 << 20);
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut image = image;
        let written = write(&mut image, 0, &[7u8; 1 << 20]).and_then(|()| image.flush());
        let _ = done.send((written, image));
    });
    let (written, mut image) = result
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the write finishes");
    written.unwrap();
    let first = host_of(&mut image, 0);
    let last = image.mapping((1 << 20) - 512).unwrap();
    assert_eq!(
        last,
        Mapping::Data {
            host: first + (1 << 20) - 512,
            owned: true
        }
    );
    assert_eq!(read(&mut image, 0, 1 << 20), vec![7u8; 1 << 20]);
    drop(image);
    check_clean(&file);
}

#[test]
fn allocation_never_hands_out_metadata_whose_refcount_lies() {
    let (file, mut image) = new_image(12, 1 << 20);
    let l1 = image.header.l1_table_offset;
    let l1_before = read_bytes(&file, l1, 4096);
    // The refcounts now call the L1 table free; the allocator must not believe them.
    image
        .refcounts
        .set_unchecked(&image.file, l1 >> 12, 0)
        .unwrap();
    let err = image.allocate(1, "guest data").unwrap_err();
    assert!(is_refused_update(&err), "{err}");
    assert!(err.to_string().contains("the L1 table"), "{err}");
    // The image takes no more writes and is marked corrupt on disk.
    let err = write(&mut image, 0, &[7u8; 4096]).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    drop(image);
    assert_eq!(read_bytes(&file, l1, 4096), l1_before);
    let features = read_u64(&file, header::INCOMPATIBLE_FIELD);
    assert_ne!(features & header::incompatible::CORRUPT, 0);
    assert!(Qcow2Image::open(file.try_clone().unwrap(), true, None).is_err());
    assert!(Qcow2Image::open(file.try_clone().unwrap(), false, None).is_err());
}

#[test]
fn a_table_naming_metadata_as_data_cannot_free_it() {
    // Found by the qcow2_writes fuzz target: a shared-looking L2 entry naming the refcount
    // block; overwriting that guest cluster copies it elsewhere and drops the old reference,
    // which would have freed the refcount block for the next allocation.
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    drop(image);
    let image = reopen(&file);
    let l2 = image.l1[0] & OFFSET_MASK;
    let block = image.refcounts.table_entry(0);
    drop(image);
    file.write_all_at(&block.to_be_bytes(), l2 + 8).unwrap();
    let mut image = reopen(&file);
    write(&mut image, 4096, &[9u8; 4096]).unwrap();
    let err = image.flush().unwrap_err();
    assert!(is_refused_update(&err), "{err}");
    assert!(err.to_string().contains("refusing to free"), "{err}");
    assert_eq!(image_refcount(&mut image, block), 1);
    assert!(write(&mut image, 0, &[2u8; 512]).is_err());
    drop(image);
    assert!(Qcow2Image::open(file.try_clone().unwrap(), true, None).is_err());
}
