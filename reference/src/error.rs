//! The reference's error type: every rejected input names what was wrong and what was expected.

/// Errors returned by the reference for invalid configurations, parameters or inputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReferenceError {
    /// A configuration value that Megatron-Core rejects (or that makes no sense).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A name (dtype, activation, layer class) that is not known.
    #[error("unknown {what} {got:?}; expected one of {expected}")]
    UnknownName {
        /// What kind of name was being parsed.
        what: &'static str,
        /// The name that was given.
        got: String,
        /// The accepted names.
        expected: &'static str,
    },
    /// A tensor with the wrong shape.
    #[error("tensor {name}: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// The tensor's name (state-dict name or input name).
        name: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape that was given.
        got: Vec<usize>,
    },
    /// A parameter that the layer needs is absent.
    #[error("missing parameter {name:?} (layer {layer})")]
    MissingParameter {
        /// The missing state-dict name.
        name: String,
        /// The layer class that asked for it.
        layer: &'static str,
    },
    /// A parameter the layer does not have.
    #[error("unexpected parameter {name:?} for layer {layer}; expected names like {example:?}")]
    UnexpectedParameter {
        /// The unexpected state-dict name.
        name: String,
        /// The layer class.
        layer: &'static str,
        /// One name the layer does have.
        example: String,
    },
    /// A parameter given in two layouts at once: a TEGroupedMLP state dict with both a single
    /// grouped tensor (`linear_fc1.weight`, `[E_l, ...]`) and a per-expert one
    /// (`linear_fc1.weight0`, ...) of the same linear.
    #[error(
        "parameter {name:?} (single grouped, [E_l, ...]) and {other:?} (one per expert) are both present; a \
         TEGroupedMLP state dict holds each linear's weight (and bias) in one layout"
    )]
    TwoLayouts {
        /// The single grouped name.
        name: String,
        /// A per-expert name of the same parameter that is present too.
        other: String,
    },
    /// A value that is NaN or infinite where finite values are required.
    #[error("tensor {name} has a non-finite value {value} at index {index:?}")]
    NonFinite {
        /// The tensor's name.
        name: String,
        /// The multi-index of the first non-finite element.
        index: Vec<usize>,
        /// The offending value.
        value: f64,
    },
    /// `tokens_per_expert` does not describe the rows of the input.
    #[error("tokens_per_expert: {0}")]
    TokenCounts(String),
}
