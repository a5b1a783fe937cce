//! Unit tests of the image itself: guest writes that would land on metadata.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;

use super::testing::{new_image, read, read_bytes, reopen, write};
use super::*;

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
