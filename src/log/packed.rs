//! Small records packed into hash buckets of a sled tree, so that a million of them cost sled
//! a few thousand entries.
//!
//! Why: sled 0.34 reads an entry of its page table for every tree node when it opens, and
//! keeps it in memory, and a leaf holds at most 16 entries (`node.rs`, `should_split`). So its
//! open time and resident memory follow the number of entries, not their bytes. Measured on
//! the rows of `agentsync-bench startup --sessions 1000000` (3,000,001 records, 486 MB,
//! copied alone into a fresh database): one entry per record opened in 127 ms with 113 MB
//! resident; the same records in 16,384 buckets opened in 10 ms with 5 MB.
//!
//! Layout: a record's key is a two-byte family (`a/`, `c/`, `l/`) and an id. It lives in the
//! bucket whose key is the family and the big-endian `u16` `crc32(id) % BUCKETS`. A bucket's
//! value is its records sorted by key, each as a little-endian `u32` key length, the key, a
//! little-endian `u32` value length and the value.
//!
//! Invariants:
//! 1. A record is in the bucket its key hashes to and nowhere else; CRC-32 is fixed by its
//!    standard, so a bucket's number never changes between builds.
//! 2. A bucket holds at least one record: one left empty is removed.
//! 3. Buckets are rewritten whole: writes to records become, per bucket touched, one read and
//!    one write of the bucket, applied by the caller (`rows::commit`).
//!
//! The price is on reads: sled materializes the whole leaf a bucket is in (up to 16 buckets,
//! about 160 KB at a million pairs), so 2,000 point reads cost about 100 ms and 100 MB of
//! sled's cache there (`docs/architecture.md`, "Settled pairs on disk").

use std::collections::BTreeMap;

use super::LogError;

/// Buckets per family. At a million pairs a bucket holds about 61 records (10 KB of rows);
/// below 16,384 sessions most hold one, as unpacked records would.
pub(super) const BUCKETS: u32 = 1 << 14;

/// A family's length at the front of every record key.
const FAMILY: usize = 2;

/// A record's key and value.
pub(super) type Record = (Vec<u8>, Vec<u8>);

/// A write to a record (`None`: remove it) or, from [`bucket_writes`], to a bucket.
pub(super) type Write = (Vec<u8>, Option<Vec<u8>>);

fn damaged(bucket: &[u8], reason: &str) -> LogError {
    let family = String::from_utf8_lossy(&bucket[..FAMILY.min(bucket.len())]);
    let number = bucket
        .get(FAMILY..)
        .map(|n| format!("{n:02x?}"))
        .unwrap_or_default();
    LogError::Rows {
        reason: format!("the row bucket {family}{number} is damaged: {reason}"),
    }
}

/// The bucket holding the record `key`.
pub(super) fn bucket_of(key: &[u8]) -> [u8; 4] {
    let (family, id) = key.split_at(FAMILY);
    let n = (crc32fast::hash(id) % BUCKETS) as u16;
    let [hi, lo] = n.to_be_bytes();
    [family[0], family[1], hi, lo]
}

/// The records of a bucket's bytes, in order. A record cut short, one out of order, or one
/// whose key does not hash to this bucket (invariant 1) is an error: the bytes are on disk,
/// and anything may have happened to them.
fn records<'a>(
    bucket: &'a [u8],
    bytes: &'a [u8],
) -> impl Iterator<Item = Result<(&'a [u8], &'a [u8]), LogError>> + 'a {
    let mut rest = bytes;
    let mut previous: &'a [u8] = &[];
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut field = || -> Result<&'a [u8], LogError> {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| damaged(bucket, "a length is cut short"))?;
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err(damaged(bucket, "a record is cut short"));
            }
            let (field, tail) = tail.split_at(len);
            rest = tail;
            Ok(field)
        };
        let record = field().and_then(|k| Ok((k, field()?))).and_then(|(k, v)| {
            if k.len() < FAMILY || bucket_of(k)[..] != bucket[..] {
                return Err(damaged(bucket, "a record is not of this bucket"));
            }
            if k <= previous {
                return Err(damaged(bucket, "records are out of order"));
            }
            previous = k;
            Ok((k, v))
        });
        if record.is_err() {
            rest = &[];
        }
        Some(record)
    })
}

fn encode(records: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let size = records.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(size);
    for (k, v) in records {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// The value of record `key`. Blocking: one sled point read.
pub(super) fn get(tree: &sled::Tree, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
    let bucket = bucket_of(key);
    let Some(bytes) = tree.get(bucket)? else {
        return Ok(None);
    };
    for record in records(&bucket, &bytes) {
        let (k, v) = record?;
        if k == key {
            return Ok(Some(v.to_vec()));
        }
    }
    Ok(None)
}

/// Every record of `family`, bucket by bucket. Blocking: reads the family's buckets.
pub(super) fn scan<'a>(
    tree: &'a sled::Tree,
    family: &'static [u8],
) -> impl Iterator<Item = Result<Record, LogError>> + 'a {
    tree.scan_prefix(family).flat_map(|item| {
        let owned: Vec<Result<Record, LogError>> = match item {
            Err(e) => vec![Err(e.into())],
            Ok((bucket, bytes)) => records(&bucket, &bytes)
                .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect(),
        };
        owned
    })
}

/// The writes to buckets that carry out `writes` to records, in bucket order. `fresh`: every
/// bucket starts empty (the caller replaces the tree) instead of as the tree holds it.
/// Blocking: one read per bucket touched unless `fresh`.
pub(super) fn bucket_writes(
    tree: &sled::Tree,
    writes: Vec<Write>,
    fresh: bool,
) -> Result<Vec<Write>, LogError> {
    let mut touched: BTreeMap<[u8; 4], Vec<Write>> = BTreeMap::new();
    for (k, v) in writes {
        touched.entry(bucket_of(&k)).or_default().push((k, v));
    }
    let mut out = Vec::with_capacity(touched.len());
    for (bucket, writes) in touched {
        let mut held = BTreeMap::new();
        if !fresh {
            if let Some(bytes) = tree.get(bucket)? {
                for record in records(&bucket, &bytes) {
                    let (k, v) = record?;
                    held.insert(k.to_vec(), v.to_vec());
                }
            }
        }
        for (k, v) in writes {
            match v {
                Some(v) => held.insert(k, v),
                None => held.remove(&k),
            };
        }
        // Invariant 2: an empty bucket is removed.
        let value = (!held.is_empty()).then(|| encode(&held));
        out.push((bucket.to_vec(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        (dir, tree)
    }

    fn apply(tree: &sled::Tree, writes: Vec<Write>) {
        let mut batch = sled::Batch::default();
        for (k, v) in bucket_writes(tree, writes, false).unwrap() {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        tree.apply_batch(batch).unwrap();
    }

    #[test]
    fn records_are_read_back_written_over_and_removed_with_their_bucket() {
        let (_dir, tree) = tree();
        let ids: Vec<Vec<u8>> = (0..40_000).map(|i| format!("a/ses_{i}").into()).collect();
        apply(
            &tree,
            ids.iter().map(|k| (k.clone(), Some(k.repeat(2)))).collect(),
        );
        apply(&tree, vec![(b"l/ses_7".to_vec(), Some(b"chat".to_vec()))]);
        // Far fewer sled entries than records, and none of another family mixed in.
        assert!(tree.len() <= BUCKETS as usize + 1, "{}", tree.len());
        assert_eq!(
            get(&tree, b"a/ses_123").unwrap(),
            Some(b"a/ses_123".repeat(2))
        );
        assert_eq!(get(&tree, b"a/ses_none").unwrap(), None);
        assert_eq!(get(&tree, b"l/ses_7").unwrap(), Some(b"chat".to_vec()));
        assert_eq!(get(&tree, b"l/ses_8").unwrap(), None);
        assert_eq!(scan(&tree, b"a/").count(), ids.len());
        assert_eq!(scan(&tree, b"l/").count(), 1);

        apply(
            &tree,
            vec![
                (b"a/ses_123".to_vec(), Some(b"new".to_vec())),
                (b"l/ses_7".to_vec(), None),
            ],
        );
        assert_eq!(get(&tree, b"a/ses_123").unwrap(), Some(b"new".to_vec()));
        assert_eq!(
            get(&tree, b"a/ses_124").unwrap(),
            Some(b"a/ses_124".repeat(2))
        );
        assert_eq!(scan(&tree, b"l/").count(), 0);
        // Invariant 2: the link's bucket held only it, and is gone.
        assert!(tree.get(bucket_of(b"l/ses_7")).unwrap().is_none());
    }

    #[test]
    fn a_bucket_number_is_fixed_by_crc32_of_the_id() {
        // crc32("ses_1") = 0x4ee2fd9b (IEEE), and 0x4ee2fd9b % 16,384 = 0x3d9b: a change of
        // hash or of the number of buckets would strand every stored row.
        assert_eq!(bucket_of(b"a/ses_1"), *b"a/\x3d\x9b");
        assert_eq!(bucket_of(b"c/ses_1")[..2], *b"c/");
    }

    #[test]
    fn a_damaged_bucket_is_an_error_naming_it_never_a_panic() {
        let (_dir, tree) = tree();
        apply(&tree, vec![(b"a/x".to_vec(), Some(b"row".to_vec()))]);
        let bucket = bucket_of(b"a/x");
        let good = tree.get(bucket).unwrap().unwrap();
        for cut in [1, 4, 6, good.len() - 1] {
            tree.insert(bucket, &good[..cut]).unwrap();
            let err = get(&tree, b"a/x").unwrap_err().to_string();
            assert!(
                err.contains("bucket a/") && err.contains("damaged"),
                "{err}"
            );
            assert!(scan(&tree, b"a/").any(|r| r.is_err()));
            let writes = vec![(b"a/x".to_vec(), None)];
            assert!(bucket_writes(&tree, writes, false).is_err());
        }
        // Whole records that do not belong: a key shorter than a family, one of another
        // bucket, two out of order.
        let record = |k: &[u8], v: &[u8]| {
            let mut out = (k.len() as u32).to_le_bytes().to_vec();
            out.extend_from_slice(k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
            out
        };
        let other = (0..)
            .map(|i| format!("a/y{i}"))
            .find(|k| bucket_of(k.as_bytes()) != bucket);
        let bad = [
            record(b"", b""),
            record(b"a", b"row"),
            record(other.unwrap().as_bytes(), b"row"),
            [record(b"a/x", b"row"), record(b"a/x", b"row")].concat(),
        ];
        for bytes in bad {
            tree.insert(bucket, bytes).unwrap();
            let err = get(&tree, b"a/x").map(|_| ()).and_then(|()| {
                scan(&tree, b"a/")
                    .collect::<Result<Vec<_>, _>>()
                    .map(|_| ())
            });
            assert!(err.unwrap_err().to_string().contains("damaged"));
        }
    }
}
