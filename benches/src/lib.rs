//! Holds only benchmarks (see `benches/`); this library is intentionally empty.
