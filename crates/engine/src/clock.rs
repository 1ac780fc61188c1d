//! The node's clock: a hybrid logical clock fed by an injectable physical clock.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use agentstore_core::{HybridClock, NodeId};

/// A source of physical time in milliseconds since the Unix epoch. Tests and the simulator
/// inject skewed or frozen clocks through this.
pub trait PhysicalClock: Send + Sync + fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl PhysicalClock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 reads as 0; the hybrid clock stays monotonic regardless.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// One node's hybrid clock, shared by its engines.
pub struct NodeClock {
    hlc: Mutex<HybridClock>,
    physical: Arc<dyn PhysicalClock>,
}

impl NodeClock {
    /// A clock for `node` on the system clock.
    pub fn system(node: NodeId, max_offset_ms: u64) -> Arc<Self> {
        Self::with_physical(node, max_offset_ms, Arc::new(SystemClock))
    }

    /// A clock for `node` on the given physical clock.
    pub fn with_physical(
        node: NodeId,
        max_offset_ms: u64,
        physical: Arc<dyn PhysicalClock>,
    ) -> Arc<Self> {
        Arc::new(Self {
            hlc: Mutex::new(HybridClock::new(node, max_offset_ms)),
            physical,
        })
    }

    /// The physical time now.
    pub fn physical_ms(&self) -> u64 {
        self.physical.now_ms()
    }

    /// Locks the hybrid clock. A std mutex, not a tokio one: it is held only for a few
    /// arithmetic steps and never across an await.
    pub fn lock(&self) -> MutexGuard<'_, HybridClock> {
        // A panic while holding the lock cannot leave the clock half-updated in a way that
        // breaks monotonicity (updates are single assignments), so poisoning is ignored.
        self.hlc
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The node this clock stamps for.
    pub fn node(&self) -> NodeId {
        self.lock().node().clone()
    }
}

impl fmt::Debug for NodeClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeClock")
            .field("hlc", &*self.lock())
            .finish_non_exhaustive()
    }
}
