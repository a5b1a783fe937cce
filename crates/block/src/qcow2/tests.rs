//! Unit tests of the image itself (this module's `mod.rs`): how guest offsets map to clusters,
//! reads of every kind of cluster, allocating and in-place writes, discard and write-zeroes,
//! and guest writes that would land on metadata.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::testing::{
    check_clean, host_of, new_file, new_image, new_overlay, read, read_bytes, read_u64, refcount,
    reopen, try_read, write,
};
use super::*;

/// Bytes that differ from cluster to cluster and compress well.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// A raw deflate stream of `data`, as qcow2 stores compressed clusters.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut compress = flate2::Compress::new(flate2::Compression::default(), false);
    let status = compress
        .compress_vec(data, &mut out, flate2::FlushCompress::Finish)
        .unwrap();
    assert_eq!(status, flate2::Status::StreamEnd);
    out
}

/// A 4 KiB-cluster image whose guest cluster 0 is `compressed` (stored 100 bytes into a cluster
/// of its own, counted) and whose cluster 1 is data of 9s. Returns the compressed bytes' host.
fn compressed_image(compressed: &[u8]) -> (File, Qcow2Image, u64) {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 4096, &[9u8; 4096]).unwrap();
    image.flush().unwrap();
    let host = file.metadata().unwrap().len().next_multiple_of(4096) + 100;
    file.write_all_at(compressed, host).unwrap();
    image.refcounts.set(&image.file, host >> 12, 1).unwrap();
    let l2 = image.l1[0] & OFFSET_MASK;
    drop(image);
    let offset_bits = 62 - (12 - 8);
    let sectors = (host % 512 + compressed.len() as u64).div_ceil(512) - 1;
    let entry = COMPRESSED | (sectors << offset_bits) | host;
    file.write_all_at(&entry.to_be_bytes(), l2).unwrap();
    let image = reopen(&file);
    (file, image, host)
}

#[test]
fn guest_offsets_split_into_l1_and_l2_indices() {
    // 4 KiB clusters: 512 entries per L2 table, each table maps 2 MiB.
    let (_file, image) = new_image(12, 16 << 20);
    assert_eq!(image.indices(0), (0, 0));
    assert_eq!(image.indices((3 << 21) + (5 << 12) + 4095), (3, 5));
    assert_eq!(image.indices((1 << 21) - 1), (0, 511));
    // 64 KiB clusters: 8192 entries, 512 MiB per table.
    let (_file, image) = new_image(16, 2 << 30);
    assert_eq!(image.indices((1 << 29) + (9 << 16) + 1), (1, 9));
}

#[test]
fn table_entries_decode_to_mappings() {
    let (_file, mut image) = new_image(16, 1 << 30);
    let c = 1u64 << 16;
    assert_eq!(image.decode(0).unwrap(), Mapping::Unallocated);
    assert_eq!(
        image.decode(3 * c).unwrap(),
        Mapping::Data {
            host: 3 * c,
            owned: false
        }
    );
    assert_eq!(
        image.decode((3 * c) | COPIED).unwrap(),
        Mapping::Data {
            host: 3 * c,
            owned: true
        }
    );
    assert_eq!(image.decode(ZERO).unwrap(), Mapping::Zero { host: None });
    assert_eq!(
        image.decode(ZERO | (2 * c) | COPIED).unwrap(),
        Mapping::Zero { host: Some(2 * c) }
    );
    assert!(image.decode(3 * c + 512).is_err(), "unaligned data");
    assert!(
        image.decode(ZERO | (3 * c + 512)).is_err(),
        "unaligned zeroes"
    );
    // Compressed, 64 KiB clusters: 54 offset bits, then the count of extra 512-byte sectors.
    let host = 0x12345;
    assert_eq!(
        image.decode(COMPRESSED | (2 << 54) | host).unwrap(),
        Mapping::Compressed {
            host,
            len: 3 * 512 - (host & 511)
        }
    );
    // Version 2 has no zero flag: the bit is reserved, the entry is data.
    image.header.version = 2;
    assert_eq!(
        image.decode(ZERO | (3 * c)).unwrap(),
        Mapping::Data {
            host: 3 * c,
            owned: false
        }
    );
    image.header.version = 3;
}

#[test]
fn unallocated_clusters_read_as_zeroes_or_from_the_backing_image() {
    let (_file, mut image) = new_image(12, 16384);
    assert_eq!(read(&mut image, 0, 16384), vec![0u8; 16384]);
    // A backing image shorter than the disk: zeroes after its end.
    let backing = pattern(6000);
    let (_file, mut image) = new_overlay(12, 16384, &backing);
    let all = read(&mut image, 0, 16384);
    assert_eq!(all[..6000], backing[..]);
    assert_eq!(all[6000..], [0u8; 16384 - 6000]);
    assert_eq!(read(&mut image, 4000, 4000)[..2000], backing[4000..6000]);
}

#[test]
fn a_partial_write_fills_the_rest_of_its_new_cluster() {
    let backing = pattern(6000);
    let (file, mut image) = new_overlay(12, 16384, &backing);
    write(&mut image, 4096 + 50, &[1u8; 100]).unwrap();
    let mut expected = backing[4096..].to_vec();
    expected.resize(4096, 0);
    expected[50..150].fill(1);
    assert_eq!(read(&mut image, 4096, 4096), expected);
    // The whole cluster is in the image, the backing image's part copied into it.
    let host = host_of(&mut image, 4096);
    assert_eq!(read_bytes(&file, host, 4096), expected);
    // Without a backing image the rest is zeroes.
    let (file, mut image) = new_image(12, 16384);
    write(&mut image, 4096 + 50, &[1u8; 100]).unwrap();
    let mut expected = vec![0u8; 4096];
    expected[50..150].fill(1);
    let host = host_of(&mut image, 4096);
    assert_eq!(read_bytes(&file, host, 4096), expected);
    assert_eq!(read(&mut image, 0, 8192)[4096..], expected[..]);
}

#[test]
fn rewrites_of_an_owned_cluster_stay_in_place() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    image.flush().unwrap();
    let host = host_of(&mut image, 0);
    let len = file.metadata().unwrap().len();
    write(&mut image, 100, &[2u8; 50]).unwrap();
    write(&mut image, 0, &[3u8; 10]).unwrap();
    assert_eq!(host_of(&mut image, 0), host);
    assert_eq!(file.metadata().unwrap().len(), len, "nothing allocated");
    assert_eq!(refcount(&mut image, host), 1);
    let on_disk = read_bytes(&file, host, 4096);
    assert_eq!(on_disk[..10], [3u8; 10]);
    assert_eq!(on_disk[10..100], [1u8; 90]);
    assert_eq!(on_disk[100..150], [2u8; 50]);
    assert_eq!(on_disk[150..], [1u8; 4096 - 150]);
}

#[test]
fn a_write_spanning_clusters_lands_in_each() {
    let (file, mut image) = new_image(12, 1 << 20);
    // Cluster 1 is owned already; clusters 0 and 2 get new ones.
    write(&mut image, 4096, &[1u8; 4096]).unwrap();
    image.flush().unwrap();
    let owned = host_of(&mut image, 4096);
    let data = pattern(8192);
    write(&mut image, 2048, &data).unwrap();
    assert_eq!(host_of(&mut image, 4096), owned, "rewritten in place");
    for guest in [0, 8192] {
        assert!(matches!(
            image.mapping(guest).unwrap(),
            Mapping::Data { owned: true, .. }
        ));
    }
    let all = read(&mut image, 0, 16384);
    assert_eq!(all[..2048], [0u8; 2048]);
    assert_eq!(all[2048..10240], data[..]);
    assert_eq!(all[10240..], [0u8; 6144]);
    drop(image);
    check_clean(&file);
}

#[test]
fn a_long_aligned_write_takes_consecutive_clusters() {
    let (file, mut image) = new_image(12, 1 << 20);
    let data = pattern(64 << 10);
    write(&mut image, 8192, &data).unwrap();
    let first = host_of(&mut image, 8192);
    for i in 0..16 {
        assert_eq!(host_of(&mut image, 8192 + i * 4096), first + i * 4096);
    }
    assert_eq!(read_bytes(&file, first, 64 << 10), data);
    assert_eq!(read(&mut image, 8192, 64 << 10), data);
}

#[test]
fn discard_unmaps_whole_clusters_only() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 12288]).unwrap();
    image.flush().unwrap();
    let middle = host_of(&mut image, 4096);
    image.discard(1000, 8192).unwrap();
    assert_eq!(image.mapping(4096).unwrap(), Mapping::Unallocated);
    let all = read(&mut image, 0, 12288);
    assert_eq!(all[..4096], [1u8; 4096]);
    assert_eq!(all[4096..8192], [0u8; 4096]);
    assert_eq!(all[8192..], [1u8; 4096]);
    image.flush().unwrap();
    assert_eq!(refcount(&mut image, middle), 0);
    drop(image);
    check_clean(&file);
}

#[test]
fn discard_over_a_backing_image_reads_zeroes_not_the_backing_data() {
    let backing = pattern(16384);
    let (_file, mut image) = new_overlay(12, 16384, &backing);
    image.discard(4096, 4096).unwrap();
    assert_eq!(image.mapping(4096).unwrap(), Mapping::Zero { host: None });
    assert_eq!(read(&mut image, 4096, 4096), vec![0u8; 4096]);
    assert_eq!(read(&mut image, 0, 4096), backing[..4096]);
    // A partial write into the discarded cluster copies zeroes, not the backing data.
    write(&mut image, 4096 + 5, &[1u8; 10]).unwrap();
    let mut expected = vec![0u8; 4096];
    expected[5..15].fill(1);
    assert_eq!(read(&mut image, 4096, 4096), expected);
    // Version 2 has no zero clusters: discard leaves the backing data visible.
    let (_file, mut image) = new_overlay(12, 16384, &backing);
    image.header.version = 2;
    write(&mut image, 4096, &[1u8; 4096]).unwrap();
    image.discard(4096, 4096).unwrap();
    assert_eq!(read(&mut image, 4096, 4096), vec![1u8; 4096]);
}

#[test]
fn write_zeroes_writes_partial_clusters_and_unmaps_whole_ones() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 12288]).unwrap();
    image.flush().unwrap();
    let (first, last) = (host_of(&mut image, 0), host_of(&mut image, 8192));
    image.write_zeroes(1000, 8192, true).unwrap();
    assert_eq!(image.mapping(4096).unwrap(), Mapping::Unallocated);
    assert_eq!(
        (host_of(&mut image, 0), host_of(&mut image, 8192)),
        (first, last)
    );
    let all = read(&mut image, 0, 12288);
    assert_eq!(all[..1000], [1u8; 1000]);
    assert_eq!(all[1000..9192], [0u8; 8192]);
    assert_eq!(all[9192..], [1u8; 12288 - 9192]);
    drop(image);
    check_clean(&file);
    // Over a backing image whole clusters become zero clusters.
    let backing = pattern(16384);
    let (_file, mut image) = new_overlay(12, 16384, &backing);
    image.write_zeroes(0, 16384, false).unwrap();
    assert_eq!(image.mapping(8192).unwrap(), Mapping::Zero { host: None });
    assert_eq!(read(&mut image, 0, 16384), vec![0u8; 16384]);
    // Version 2 over a backing image: zeroes are written as data.
    let (_file, mut image) = new_overlay(12, 16384, &backing);
    image.header.version = 2;
    image.write_zeroes(4096, 4096, true).unwrap();
    assert!(matches!(
        image.mapping(4096).unwrap(),
        Mapping::Data { owned: true, .. }
    ));
    assert_eq!(read(&mut image, 4096, 4096), vec![0u8; 4096]);
}

#[test]
fn compressed_clusters_are_inflated_on_read() {
    let data = pattern(4096);
    let (_file, mut image, host) = compressed_image(&deflate(&data));
    assert!(matches!(
        image.mapping(0).unwrap(),
        Mapping::Compressed { host: h, .. } if h == host
    ));
    assert_eq!(read(&mut image, 0, 4096), data);
    assert_eq!(read(&mut image, 100, 200), data[100..300]);
    let across = read(&mut image, 4000, 200);
    assert_eq!(across[..96], data[4000..]);
    assert_eq!(across[96..], [9u8; 104]);
}

#[test]
fn a_write_into_a_compressed_cluster_copies_it_and_frees_it() {
    let data = pattern(4096);
    let (file, mut image, host) = compressed_image(&deflate(&data));
    write(&mut image, 50, &[7u8; 10]).unwrap();
    assert!(matches!(
        image.mapping(0).unwrap(),
        Mapping::Data { owned: true, .. }
    ));
    let mut expected = data.clone();
    expected[50..60].fill(7);
    assert_eq!(read(&mut image, 0, 4096), expected);
    assert_eq!(refcount(&mut image, host), 1);
    image.flush().unwrap();
    assert_eq!(refcount(&mut image, host), 0);
    drop(image);
    check_clean(&file);
}

#[test]
fn damaged_compressed_clusters_are_read_errors() {
    let short = deflate(&pattern(100));
    let garbage = vec![0xffu8; 300];
    for compressed in [short, garbage] {
        let (_file, mut image, _) = compressed_image(&compressed);
        let err = try_read(&mut image, 0, 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert_eq!(read(&mut image, 4096, 4096), vec![9u8; 4096]);
    }
}

#[test]
fn accesses_beyond_the_disk_are_refused() {
    let (_file, mut image) = new_image(12, 1 << 20);
    let size = 1u64 << 20;
    assert_eq!(
        try_read(&mut image, size - 10, 20).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        write(&mut image, u64::MAX - 5, &[1u8; 10])
            .unwrap_err()
            .kind(),
        io::ErrorKind::InvalidInput
    );
    assert!(image.discard(size, 1).is_err());
    assert!(image.write_zeroes(size - 4096, 8192, true).is_err());
    assert_eq!(read(&mut image, size - 4096, 4096), vec![0u8; 4096]);
}

#[test]
fn a_read_only_image_takes_no_writes() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    drop(image);
    let before = read_bytes(&file, 0, file.metadata().unwrap().len());
    let mut image = Qcow2Image::open(file.try_clone().unwrap(), false, None).unwrap();
    let denied = io::ErrorKind::PermissionDenied;
    assert_eq!(write(&mut image, 0, &[2u8; 10]).unwrap_err().kind(), denied);
    assert_eq!(image.discard(0, 4096).unwrap_err().kind(), denied);
    assert_eq!(
        image.write_zeroes(0, 4096, true).unwrap_err().kind(),
        denied
    );
    assert_eq!(read(&mut image, 0, 4096), vec![1u8; 4096]);
    drop(image);
    assert_eq!(read_bytes(&file, 0, file.metadata().unwrap().len()), before);
}

#[test]
fn opening_for_writing_clears_autoclear_bits_and_refuses_dirty_images() {
    let file = new_file(12, 1 << 20);
    let bits = header::autoclear::BITMAPS.to_be_bytes();
    file.write_all_at(&bits, header::AUTOCLEAR_FIELD).unwrap();
    drop(Qcow2Image::open(file.try_clone().unwrap(), false, None).unwrap());
    assert_eq!(
        read_u64(&file, header::AUTOCLEAR_FIELD),
        header::autoclear::BITMAPS
    );
    let image = reopen(&file);
    assert_eq!(image.header().autoclear_features, 0);
    assert_eq!(read_u64(&file, header::AUTOCLEAR_FIELD), 0);
    drop(image);
    let dirty = header::incompatible::DIRTY.to_be_bytes();
    file.write_all_at(&dirty, header::INCOMPATIBLE_FIELD)
        .unwrap();
    let err = Qcow2Image::open(file.try_clone().unwrap(), true, None).unwrap_err();
    assert!(err.to_string().contains("dirty"), "{err}");
    assert!(Qcow2Image::open(file.try_clone().unwrap(), false, None).is_ok());
}

#[test]
fn a_guest_write_into_a_data_cluster_that_is_metadata_is_refused() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    drop(image);
    // Point guest cluster 1's L2 entry at the refcount block, flagged as owned.
    let image = reopen(&file);
    let l2 = image.l1[0] & OFFSET_MASK;
    let block = image.refcounts.table_entry(0);
    drop(image);
    file.write_all_at(&(block | COPIED).to_be_bytes(), l2 + 8)
        .unwrap();
    let block_before = read_bytes(&file, block, 4096);
    let mut image = reopen(&file);
    let err = write(&mut image, 4096 + 512, &[9u8; 512]).unwrap_err();
    assert!(err.to_string().contains("a refcount block"), "{err}");
    assert!(
        write(&mut image, 0, &[2u8; 512]).is_err(),
        "later writes fail too"
    );
    assert_eq!(
        read(&mut image, 0, 4096),
        vec![1u8; 4096],
        "reads still work"
    );
    drop(image);
    assert_eq!(read_bytes(&file, block, 4096), block_before);
    let features = read_u64(&file, header::INCOMPATIBLE_FIELD);
    assert_ne!(features & header::incompatible::CORRUPT, 0);
}

#[test]
fn writes_through_an_l2_table_that_points_at_itself_are_refused() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    let l2 = image.l1[0] & OFFSET_MASK;
    drop(image);
    file.write_all_at(&(l2 | COPIED).to_be_bytes(), l2 + 16)
        .unwrap();
    let l2_before = read_bytes(&file, l2, 4096);
    let mut image = reopen(&file);
    let err = write(&mut image, 2 * 4096, &[0xffu8; 4096]).unwrap_err();
    assert!(err.to_string().contains("an L2 table"), "{err}");
    drop(image);
    assert_eq!(read_bytes(&file, l2, 4096), l2_before);
}
