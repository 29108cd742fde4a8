//! The packet mark an NFQUEUE verdict sets: which bits carry the backend id.

/// Where backend ids live in the packet mark. The all-ones id means "reject".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkLayout {
    backend_mask: u32,
    /// The bit pykp's rules set on a queued packet from inside the cluster (a pod, the
    /// node): the short-circuit of `externalTrafficPolicy: Local` applies. 0: none.
    cluster_source_bit: u32,
}

/// kube-proxy's masquerade (0x4000) and drop (0x8000) bits: a backend field must not
/// overlap them, so pykp and kube-proxy marks can coexist during a migration.
pub const KUBE_PROXY_BITS: u32 = 0xc000;

impl MarkLayout {
    pub fn new(backend_mask: u32) -> Result<Self, String> {
        if backend_mask == 0 {
            return Err("mark mask is empty".into());
        }
        let shift = backend_mask.trailing_zeros();
        let width = (backend_mask >> shift).trailing_ones();
        if backend_mask >> shift != (1u64 << width) as u32 - 1 && width != 32 {
            return Err(format!("mark mask {backend_mask:#x} is not one contiguous run of bits"));
        }
        if backend_mask & KUBE_PROXY_BITS != 0 {
            return Err(format!(
                "mark mask {backend_mask:#x} overlaps kube-proxy's 0x4000/0x8000 mark bits"
            ));
        }
        if width < 2 {
            return Err(format!("mark mask {backend_mask:#x} leaves no room for backend ids"));
        }
        Ok(MarkLayout { backend_mask, cluster_source_bit: 0 })
    }

    /// The same layout with the cluster-source bit (one bit, outside the backend field and
    /// kube-proxy's bits).
    pub fn with_cluster_source_bit(self, bit: u32) -> Result<Self, String> {
        if bit != 0 && (bit.count_ones() != 1 || bit & (self.backend_mask | KUBE_PROXY_BITS) != 0) {
            return Err(format!(
                "cluster source bit {bit:#x} is not one bit clear of the mark mask and kube-proxy's bits"
            ));
        }
        Ok(MarkLayout { cluster_source_bit: bit, ..self })
    }

    /// Whether a packet's mark says it comes from inside the cluster.
    pub fn from_cluster(&self, packet_mark: u32) -> bool {
        packet_mark & self.cluster_source_bit != 0
    }

    pub fn backend_mask(&self) -> u32 {
        self.backend_mask
    }

    fn shift(&self) -> u32 {
        self.backend_mask.trailing_zeros()
    }

    /// The largest id a mark can carry (the all-ones value is the reject mark).
    pub fn max_backend_id(&self) -> u32 {
        (self.backend_mask >> self.shift()) - 1
    }

    pub fn reject_mark(&self) -> u32 {
        self.backend_mask
    }

    pub fn backend_mark(&self, id: u32) -> Option<u32> {
        (id >= 1 && id <= self.max_backend_id()).then(|| id << self.shift())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_validated() {
        assert!(MarkLayout::new(0xffff_0000).is_ok());
        assert!(MarkLayout::new(0).is_err());
        assert!(MarkLayout::new(0x00ff_c000).is_err(), "overlaps kube-proxy's bits");
        assert!(MarkLayout::new(0x0f0f_0000).is_err(), "not contiguous");
        let l = MarkLayout::new(0x0fff_0000).unwrap();
        assert_eq!(l.max_backend_id(), 0xffe);
        assert_eq!(l.backend_mark(1), Some(0x0001_0000));
        assert_eq!(l.backend_mark(0), None);
        assert_eq!(l.backend_mark(0xfff), None, "the all-ones id is the reject mark");
        assert_eq!(l.reject_mark(), 0x0fff_0000);
    }
}
