//! Guest RAM across a handoff: the layout travels in the record, each region's memfd is kept
//! (role [`FdRole::Ram`]), and the restore checks every inherited memfd against the layout
//! before anything is mapped.

use std::fs::File;

use serde::{Deserialize, Serialize};

use crate::memory::{map_regions, GuestRam, MemoryError, RamRegion};
use crate::persist::{FdRole, Persist, PersistError, RestoreFds, SaveFds};

/// One guest RAM region as saved: where it sits and how it is backed. Its memfd is the
/// preserved fd [`FdRole::Ram`] with the region's index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Backed by 2 MiB hugetlb pages.
    #[serde(default)]
    pub hugepages: bool,
}

impl GuestRam {
    /// The layout, region by region.
    pub fn layout(&self) -> Vec<MemoryRegionState> {
        self.regions
            .iter()
            .map(|r| MemoryRegionState {
                guest_addr: r.guest_addr,
                size: r.size,
                hugepages: r.hugepages,
            })
            .collect()
    }
}

/// Checks a layout before it is mapped: at least one region, each non-empty and page
/// aligned, in address order without overlap.
pub fn validate_layout(layout: &[MemoryRegionState]) -> Result<(), PersistError> {
    let bad = |why: String| {
        Err(PersistError::Inconsistent(format!(
            "guest RAM layout: {why}"
        )))
    };
    if layout.is_empty() {
        return bad("no region".into());
    }
    let mut end = 0u64;
    for (i, r) in layout.iter().enumerate() {
        if r.size == 0 || r.size % 4096 != 0 || r.guest_addr % 4096 != 0 {
            return bad(format!("region {i} is empty or not page aligned"));
        }
        if r.guest_addr < end {
            return bad(format!("region {i} overlaps the one before"));
        }
        end = match r.guest_addr.checked_add(r.size) {
            Some(e) => e,
            None => return bad(format!("region {i} ends beyond the address space")),
        };
    }
    Ok(())
}

impl Persist for GuestRam {
    type State = Vec<MemoryRegionState>;
    type Args = ();
    type Error = MemoryError;

    fn save(&self, fds: &mut SaveFds) -> Result<Self::State, PersistError> {
        for (i, r) in self.regions.iter().enumerate() {
            fds.keep(FdRole::Ram(i), &r.memfd)?;
        }
        Ok(self.layout())
    }

    fn restore(layout: &Self::State, _: (), fds: &mut RestoreFds) -> Result<Self, MemoryError> {
        validate_layout(layout)?;
        let regions = layout
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = FdRole::Ram(i);
                let memfd = File::from(fds.take(role)?);
                let len = memfd
                    .metadata()
                    .map_err(|e| PersistError::Unusable(role, e))?
                    .len();
                if len < m.size {
                    return Err(PersistError::Inconsistent(format!(
                        "guest RAM region {i} is {} bytes but its memfd holds {len}",
                        m.size
                    )));
                }
                Ok(RamRegion {
                    guest_addr: m.guest_addr,
                    size: m.size,
                    memfd,
                    hugepages: m.hugepages,
                })
            })
            .collect::<Result<Vec<_>, PersistError>>()?;
        map_regions(regions, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;
    use crate::persist::RestoreFds;

    fn ram() -> GuestRam {
        crate::memory::create(&MemoryConfig {
            size: 16 << 20,
            hugepages: false,
            prefault: false,
        })
        .unwrap()
    }

    fn handed_over(ram: &GuestRam) -> (Vec<MemoryRegionState>, RestoreFds) {
        let mut fds = SaveFds::new();
        let layout = ram.save(&mut fds).unwrap();
        let received = fds
            .describe()
            .into_iter()
            .map(|p| {
                let fd = ram.regions[0].memfd.try_clone().unwrap();
                (p.name, fd.into())
            })
            .collect();
        let inherited = cpr::Inherited::from_owned(received).unwrap();
        (layout, RestoreFds::new(inherited))
    }

    #[test]
    fn ram_is_taken_over_with_its_layout_and_checked_against_the_memfds() {
        let ram = ram();
        let (layout, mut fds) = handed_over(&ram);
        assert_eq!(layout.len(), 1);
        let restored = GuestRam::restore(&layout, (), &mut fds).unwrap();
        assert_eq!(restored.layout(), layout);

        // A layout bigger than its memfd is refused before anything is mapped.
        let (mut layout, mut fds) = handed_over(&ram);
        layout[0].size *= 2;
        assert!(matches!(
            GuestRam::restore(&layout, (), &mut fds),
            Err(MemoryError::Persist(PersistError::Inconsistent(_)))
        ));
        // So are an empty layout and overlapping regions.
        assert!(validate_layout(&[]).is_err());
        let r = MemoryRegionState {
            guest_addr: 0,
            size: 1 << 20,
            hugepages: false,
        };
        assert!(validate_layout(&[r.clone(), r.clone()]).is_err());
        // A region whose memfd was not handed over.
        let mut none = RestoreFds::new(cpr::Inherited::default());
        assert!(matches!(
            GuestRam::restore(&vec![r], (), &mut none),
            Err(MemoryError::Persist(PersistError::Missing(
                FdRole::Ram(0),
                _
            )))
        ));
    }
}
