//! ClusterIP and NodePort allocation, in the service create path as kube-apiserver does it. Each
//! range's bitmap is one object in the store (`/registry/ranges/...`, like kube-apiserver's
//! RangeAllocation), changed with compare-and-swap: two concurrent creates never get the same
//! address, and a restarted server continues from what is stored.

use std::{net::Ipv4Addr, sync::Arc};

use base64::Engine;
use control_plane_store::{Store, StoreError};
use serde_json::{Value, json};

/// A range of numbers (IPv4 addresses as u32, or ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub first: u32,
    pub size: u32,
}

impl Range {
    /// The service CIDR, without its network and broadcast addresses, as kube-apiserver uses it.
    pub fn cidr(cidr: &str) -> Result<Self, String> {
        let (addr, bits) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?} is not a CIDR"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{cidr:?}: {e}"))?;
        let bits: u32 = bits.parse().map_err(|e| format!("{cidr:?}: {e}"))?;
        if !(8..=30).contains(&bits) {
            return Err(format!("{cidr:?}: prefix length must be between 8 and 30"));
        }
        let size = 1u32 << (32 - bits);
        let network = u32::from(addr) & !(size - 1);
        Ok(Self {
            first: network + 1,
            size: size - 2,
        })
    }

    pub fn ports(spec: &str) -> Result<Self, String> {
        let (a, b) = spec
            .split_once('-')
            .ok_or_else(|| format!("{spec:?} is not a port range like 30000-32767"))?;
        let (a, b): (u32, u32) = (
            a.parse().map_err(|_| format!("{spec:?}"))?,
            b.parse().map_err(|_| format!("{spec:?}"))?,
        );
        if a == 0 || b > 65535 || a > b {
            return Err(format!("{spec:?}: not a port range"));
        }
        Ok(Self {
            first: a,
            size: b - a + 1,
        })
    }

    pub fn contains(&self, n: u32) -> bool {
        n >= self.first && n - self.first < self.size
    }
}

/// Why an explicit request could not be allocated.
#[derive(Debug, PartialEq, Eq)]
pub enum AllocError {
    OutOfRange,
    Taken,
    Full,
    Store(String),
}

/// One range's bitmap in the store.
pub struct Allocator<S: Store> {
    store: Arc<S>,
    key: &'static str,
    range: Range,
    /// Offsets skipped by automatic allocation (the first ClusterIP, for the API service).
    reserved: u32,
}

impl<S: Store> Allocator<S> {
    pub fn new(store: Arc<S>, key: &'static str, range: Range, reserved: u32) -> Self {
        Self {
            store,
            key,
            range,
            reserved,
        }
    }

    pub fn range(&self) -> Range {
        self.range
    }

    async fn load(&self) -> Result<(Vec<u8>, Option<i64>), AllocError> {
        let bytes = (self.range.size as usize).div_ceil(8);
        match self
            .store
            .get(self.key)
            .await
            .map_err(|e| AllocError::Store(e.to_string()))?
        {
            None => Ok((vec![0; bytes], None)),
            Some(kv) => {
                let doc: Value = serde_json::from_slice(&kv.value)
                    .map_err(|e| AllocError::Store(e.to_string()))?;
                let mut data = base64::engine::general_purpose::STANDARD
                    .decode(doc["data"].as_str().unwrap_or_default())
                    .map_err(|e| AllocError::Store(e.to_string()))?;
                data.resize(bytes, 0);
                Ok((data, Some(kv.mod_revision)))
            }
        }
    }

    async fn save(&self, data: &[u8], revision: Option<i64>) -> Result<bool, AllocError> {
        let doc = json!({
            "range": format!("{}+{}", self.range.first, self.range.size),
            "data": base64::engine::general_purpose::STANDARD.encode(data),
        });
        let value = serde_json::to_vec(&doc).expect("serializes");
        let result = match revision {
            None => self.store.create(self.key, value).await.map(drop),
            Some(rev) => self.store.update(self.key, value, rev).await.map(drop),
        };
        match result {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(AllocError::Store(e.to_string())),
        }
    }

    /// Allocates `wanted` if given (it must be free and in range), else the first free number
    /// after a random start. Retries on concurrent changes.
    pub async fn allocate(&self, wanted: Option<u32>) -> Result<u32, AllocError> {
        loop {
            let (mut data, revision) = self.load().await?;
            let offset = self.find(&data, wanted)?;
            data[(offset / 8) as usize] |= 1 << (offset % 8);
            if self.save(&data, revision).await? {
                return Ok(self.range.first + offset);
            }
        }
    }

    /// What [`Allocator::allocate`] would give now, reserving nothing (dry-run requests).
    pub async fn available(&self, wanted: Option<u32>) -> Result<u32, AllocError> {
        let (data, _) = self.load().await?;
        Ok(self.range.first + self.find(&data, wanted)?)
    }

    /// The offset of `wanted` if it is free and in range, else of the first free number after
    /// a random start.
    fn find(&self, data: &[u8], wanted: Option<u32>) -> Result<u32, AllocError> {
        let bit = |i: u32| data[(i / 8) as usize] & (1 << (i % 8)) != 0;
        match wanted {
            Some(n) if !self.range.contains(n) => Err(AllocError::OutOfRange),
            Some(n) if bit(n - self.range.first) => Err(AllocError::Taken),
            Some(n) => Ok(n - self.range.first),
            None => {
                let start = rand::random_range(0..self.range.size);
                (0..self.range.size)
                    .map(|k| (start + k) % self.range.size)
                    .find(|&i| i >= self.reserved && !bit(i))
                    .ok_or(AllocError::Full)
            }
        }
    }

    /// Returns a number to the range (no-op if it was free or is out of range).
    pub async fn release(&self, n: u32) -> Result<(), AllocError> {
        if !self.range.contains(n) {
            return Ok(());
        }
        loop {
            let (mut data, revision) = self.load().await?;
            let i = n - self.range.first;
            if data[(i / 8) as usize] & (1 << (i % 8)) == 0 {
                return Ok(());
            }
            data[(i / 8) as usize] &= !(1 << (i % 8));
            if self.save(&data, revision).await? {
                return Ok(());
            }
        }
    }

    /// Every allocated number (for the repair loop).
    pub async fn allocated(&self) -> Result<Vec<u32>, AllocError> {
        let (data, _) = self.load().await?;
        Ok((0..self.range.size)
            .filter(|&i| data[(i / 8) as usize] & (1 << (i % 8)) != 0)
            .map(|i| self.range.first + i)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        let r = Range::cidr("10.96.0.0/16").unwrap();
        assert_eq!(Ipv4Addr::from(r.first), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(r.size, 65534);
        assert!(r.contains(u32::from(Ipv4Addr::new(10, 96, 255, 254))));
        assert!(
            !r.contains(u32::from(Ipv4Addr::new(10, 96, 255, 255))),
            "no broadcast address"
        );
        let p = Range::ports("30000-32767").unwrap();
        assert_eq!((p.first, p.size), (30000, 2768));
        assert!(Range::ports("3-2").is_err());
    }
}
