//! The integration-test binary.

mod checkpoint;
