//! The image file's bytes: header, record table and trailer (the module documentation of
//! `persist` gives the layout), written and checked here and nowhere else.

use anyhow::{Context, Result, ensure};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

const MAGIC: &[u8; 8] = b"VRAMDISK";
const TAIL_MAGIC: &[u8; 8] = b"VRDKTAIL";
const VERSION: u32 = 1;
pub(super) const HEADER_LEN: usize = 64;
pub(super) const TABLE_ENTRY_LEN: usize = 24;
pub(super) const TRAILER_LEN: usize = 48;
/// Largest record: large enough for the disk to stream, small enough that a few in flight
/// fit easily in the device's buffer pool.
pub const RECORD_SIZE: u64 = 8 << 20;

/// One record of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) offset: u64,
    pub(super) length: u64,
    pub(super) crc: u32,
}

/// The header of a file saved from a device of `device_size` bytes, stamped now.
pub(super) fn header_bytes(device_size: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&device_size.to_le_bytes());
    h[24..32].copy_from_slice(&RECORD_SIZE.to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    h[32..40].copy_from_slice(&now.to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The record table and trailer that end a file holding `records` (`data_bytes` in all), whose
/// header and data have the crc32c `whole`; with the table's offset in the file.
pub(super) fn end_bytes(
    records: &[Record],
    data_bytes: u64,
    whole: u32,
) -> (Vec<u8>, [u8; TRAILER_LEN], u64) {
    let mut table = Vec::with_capacity(records.len() * TABLE_ENTRY_LEN);
    for r in records {
        table.extend_from_slice(&r.offset.to_le_bytes());
        table.extend_from_slice(&r.length.to_le_bytes());
        table.extend_from_slice(&r.crc.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
    }
    let table_offset = HEADER_LEN as u64 + data_bytes;
    let file_len = table_offset + table.len() as u64 + TRAILER_LEN as u64;
    let whole = crc32c::crc32c_append(whole, &table);
    let mut trailer = [0u8; TRAILER_LEN];
    trailer[0..8].copy_from_slice(TAIL_MAGIC);
    trailer[8..16].copy_from_slice(&(records.len() as u64).to_le_bytes());
    trailer[16..24].copy_from_slice(&table_offset.to_le_bytes());
    trailer[24..32].copy_from_slice(&data_bytes.to_le_bytes());
    trailer[32..40].copy_from_slice(&file_len.to_le_bytes());
    trailer[40..44].copy_from_slice(&crc32c::crc32c(&table).to_le_bytes());
    let whole = crc32c::crc32c_append(whole, &trailer[..44]);
    trailer[44..48].copy_from_slice(&whole.to_le_bytes());
    (table, trailer, table_offset)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// The parts of a saved file that can be checked without reading its data.
#[derive(Debug)]
pub struct FileLayout {
    /// Size of the device the file was saved from.
    pub device_size: u64,
    /// Total data bytes.
    pub data_bytes: u64,
    /// File length.
    pub file_bytes: u64,
    pub(super) records: Vec<Record>,
    table: Vec<u8>,
    pub(super) header: [u8; HEADER_LEN],
    trailer: [u8; TRAILER_LEN],
}

/// Reads and checks the header, trailer and table of the file at `path`: everything but the
/// data. Fails with a sentence naming what is wrong.
pub fn inspect(path: &Path) -> Result<FileLayout> {
    let shown = path.display();
    let mut f = File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let len = f
        .metadata()
        .with_context(|| format!("cannot stat {shown}"))?
        .len();
    ensure!(
        len >= (HEADER_LEN + TRAILER_LEN) as u64,
        "{shown} is not a vramdisk image: it is only {len} bytes long"
    );
    let mut header = [0u8; HEADER_LEN];
    f.read_exact(&mut header)
        .with_context(|| format!("reading the header of {shown}"))?;
    ensure!(
        &header[0..8] == MAGIC,
        "{shown} is not a vramdisk image (no VRAMDISK magic at its start)"
    );
    let version = u32_at(&header, 8);
    ensure!(
        version == VERSION,
        "{shown} is a vramdisk image of format version {version}; this vramdisk reads version {VERSION}"
    );
    ensure!(
        u32_at(&header, 60) == crc32c::crc32c(&header[..60]),
        "{shown} is corrupt: the header checksum does not match"
    );
    let device_size = u64_at(&header, 16);
    let mut trailer = [0u8; TRAILER_LEN];
    f.seek(SeekFrom::Start(len - TRAILER_LEN as u64))?;
    f.read_exact(&mut trailer)
        .with_context(|| format!("reading the trailer of {shown}"))?;
    ensure!(
        &trailer[0..8] == TAIL_MAGIC,
        "{shown} is truncated or was not completely written (no trailer at its end)"
    );
    let count = u64_at(&trailer, 8);
    let table_offset = u64_at(&trailer, 16);
    let data_bytes = u64_at(&trailer, 24);
    let file_len = u64_at(&trailer, 32);
    ensure!(
        file_len == len,
        "{shown} is damaged: its trailer says {file_len} bytes but the file has {len}"
    );
    let table_len = count
        .checked_mul(TABLE_ENTRY_LEN as u64)
        .filter(|t| {
            table_offset == HEADER_LEN as u64 + data_bytes
                && table_offset
                    .checked_add(*t)
                    .and_then(|e| e.checked_add(TRAILER_LEN as u64))
                    == Some(len)
        })
        .with_context(|| format!("{shown} is corrupt: its trailer does not match its length"))?;
    let mut table = vec![0u8; table_len as usize];
    f.seek(SeekFrom::Start(table_offset))?;
    f.read_exact(&mut table)
        .with_context(|| format!("reading the record table of {shown}"))?;
    ensure!(
        u32_at(&trailer, 40) == crc32c::crc32c(&table),
        "{shown} is corrupt: the record table checksum does not match"
    );
    let mut records = Vec::with_capacity(count as usize);
    let mut end_of_last = 0u64;
    let mut sum = 0u64;
    for e in table.chunks_exact(TABLE_ENTRY_LEN) {
        let r = Record {
            offset: u64_at(e, 0),
            length: u64_at(e, 8),
            crc: u32_at(e, 16),
        };
        let end = r.offset.checked_add(r.length);
        ensure!(
            r.length > 0
                && r.length <= RECORD_SIZE
                && r.offset >= end_of_last
                && end.is_some_and(|e| e <= device_size),
            "{shown} is corrupt: record at offset {} of length {} is out of order or out of range",
            r.offset,
            r.length
        );
        end_of_last = r.offset + r.length;
        sum += r.length;
        records.push(r);
    }
    ensure!(
        sum == data_bytes,
        "{shown} is corrupt: its records add up to {sum} bytes, its trailer says {data_bytes}"
    );
    Ok(FileLayout {
        device_size,
        data_bytes,
        file_bytes: len,
        records,
        table,
        header,
        trailer,
    })
}

/// Checks the whole-file checksum, given `data_crc`, the crc32c of the header and the data.
pub(super) fn check_whole(path: &Path, layout: &FileLayout, data_crc: u32) -> Result<()> {
    let whole = crc32c::crc32c_append(data_crc, &layout.table);
    let whole = crc32c::crc32c_append(whole, &layout.trailer[..44]);
    ensure!(
        whole == u32_at(&layout.trailer, 44),
        "{} is corrupt: the whole-file checksum does not match",
        path.display()
    );
    Ok(())
}
