//! Guessing an image's format from its first bytes, and the rule that keeps a guessed raw
//! image raw.
//!
//! Probing is only ever a convenience for an image whose owner did not say its format: a raw
//! disk holds whatever its guest wrote, so a guest that writes a qcow2 header (naming a host
//! file as its backing file) into sector 0 would turn its disk into that file at the next
//! probe. Callers that know the format pass it; the daemon records every volume's format once.
//! When an image was probed as raw, [`first_sector_after`] and [`refuse_disguise`] let the raw
//! driver refuse guest writes that would make it probe as something else (QEMU's rule for
//! probed raw images).
//!
//! Threading: pure functions.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::Format;

/// Bytes of the image the probe looks at; a write below this is checked on a probed raw image.
pub const PROBE_LEN: usize = 512;

/// What the first bytes of an image say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// Nothing recognisable: raw data.
    Raw,
    Qcow2,
    /// A format Ferro does not open (`vmdk`, `vdi`, ...).
    Other(&'static str),
}

/// Signatures at the start of the formats QEMU knows, so an image of one of them is not
/// mistaken for raw data, and a raw image cannot be made to look like one.
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (0, b"QED\0", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0x40, &0xbeda_107f_u32.to_le_bytes(), "vdi"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
];

const QCOW_MAGIC: &[u8] = b"QFI\xfb";

/// The format `first` (an image's first bytes, up to [`PROBE_LEN`]) looks like.
pub fn probe_bytes(first: &[u8]) -> Probed {
    if first.starts_with(QCOW_MAGIC) {
        // Version 1 is the old qcow format, which Ferro does not open.
        return match first.get(4..8) {
            Some([0, 0, 0, 1]) => Probed::Other("qcow"),
            _ => Probed::Qcow2,
        };
    }
    SIGNATURES
        .iter()
        .find(|(at, magic, _)| first.get(*at..at + magic.len()) == Some(*magic))
        .map_or(Probed::Raw, |&(_, _, name)| Probed::Other(name))
}

/// Reads the first bytes of `file` and probes them.
pub fn probe_file(file: &File) -> io::Result<Probed> {
    let mut first = [0u8; PROBE_LEN];
    let mut filled = 0;
    while filled < PROBE_LEN {
        match file.read_at(&mut first[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(probe_bytes(&first[..filled]))
}

/// The format of `file` from its first bytes; an image of a format Ferro does not open is an
/// error saying what to do, not raw data.
pub fn detect(file: &File) -> io::Result<Format> {
    match probe_file(file)? {
        Probed::Raw => Ok(Format::Raw),
        Probed::Qcow2 => Ok(Format::Qcow2),
        Probed::Other(name) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it looks like a {name} image, which Ferro does not open: convert it with \
                 `qemu-img convert -O qcow2`, or, if it is raw data, say its format is raw"
            ),
        )),
    }
}

/// The image's first [`PROBE_LEN`] bytes once `data` is written at `offset`: `current` is what
/// they are now (shorter if the image is smaller).
pub fn first_sector_after(current: &[u8], offset: u64, data: &[u8]) -> Vec<u8> {
    let mut sector = current.to_vec();
    let Ok(start) = usize::try_from(offset) else {
        return sector;
    };
    if start >= PROBE_LEN {
        return sector;
    }
    let end = start.saturating_add(data.len()).min(PROBE_LEN);
    if sector.len() < end {
        sector.resize(end, 0);
    }
    sector[start..end].copy_from_slice(&data[..end - start]);
    sector
}

/// The error for a write that would make a probed raw image probe as another format, or
/// `None` if `sector` (the first bytes after the write) still looks raw.
pub fn refuse_disguise(sector: &[u8]) -> Option<io::Error> {
    let name = match probe_bytes(sector) {
        Probed::Raw => return None,
        Probed::Qcow2 => "qcow2",
        Probed::Other(name) => name,
    };
    Some(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "refused a write to sector 0 that would make this probed raw image look like a \
             {name} image (give format=raw to allow it)"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart_by_their_signatures() {
        assert_eq!(probe_bytes(b""), Probed::Raw);
        assert_eq!(probe_bytes(&[0u8; 512]), Probed::Raw);
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x03"), Probed::Qcow2);
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x02"), Probed::Qcow2);
        assert_eq!(probe_bytes(b"QFI\xfb"), Probed::Qcow2);
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x01"), Probed::Other("qcow"));
        assert_eq!(probe_bytes(b"KDMV\x01"), Probed::Other("vmdk"));
        assert_eq!(probe_bytes(b"conectix\0\0"), Probed::Other("vpc"));
        let mut vdi = [0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe_bytes(&vdi), Probed::Other("vdi"));
        // A signature cut off by the end of the image is no signature.
        assert_eq!(probe_bytes(&vdi[..0x42]), Probed::Raw);
        assert_eq!(probe_bytes(b"QED"), Probed::Raw);
    }

    #[test]
    fn detect_refuses_formats_ferro_does_not_open() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), b"vhdxfile and more").unwrap();
        let err = detect(file.as_file()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("vhdx"), "{err}");
        std::fs::write(file.path(), b"QFI").unwrap();
        assert_eq!(detect(file.as_file()).unwrap(), Format::Raw);
    }

    #[test]
    fn a_write_is_judged_by_the_whole_sector_it_leaves() {
        // Two halves of the magic, each harmless alone, make a qcow2 header together.
        let current = first_sector_after(&[0u8; 512], 0, b"QF");
        assert!(refuse_disguise(&current).is_none());
        let after = first_sector_after(&current, 2, b"I\xfb");
        let err = refuse_disguise(&after).unwrap();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        // A write starting past the probed bytes changes nothing there.
        assert_eq!(first_sector_after(&current, 512, b"QFI\xfb"), current);
        assert_eq!(first_sector_after(&current, u64::MAX, b"x"), current);
        // A write longer than the sector is cut to it; a short image grows.
        assert_eq!(first_sector_after(&[], 510, b"abcd"), {
            let mut v = vec![0u8; 512];
            v[510..].copy_from_slice(b"ab");
            v
        });
    }
}
