//! Typed values of the command line's enum flags. Each wraps the library's own enum and takes
//! its values and names from it (`LayerClass::ALL`/`name`, `Property::ALL`/`name`,
//! `ModelShape::ALL`/`name`, and the benches' `Mode` and `GroupedCase`), so the
//! accepted spellings cannot drift from the library, `--help` lists them, and clap rejects a
//! misspelt value naming the accepted ones (exit code 2).

use clap::builder::PossibleValue;
use moe_harness::properties::Property;
use moe_harness::shapes::ModelShape;
use moe_reference::{Fp8Recipe, LayerClass, TeFormat};

/// Declares `$arg`, a [`clap::ValueEnum`] over every value of `$inner::ALL`, each shown as
/// `$value` (a [`PossibleValue`] built from `$v`).
macro_rules! library_value_enum {
    ($(#[$doc:meta])* $arg:ident($inner:ty), |$v:ident| $value:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $arg(pub $inner);

        impl clap::ValueEnum for $arg {
            fn value_variants<'a>() -> &'a [Self] {
                const ALL: [$arg; <$inner>::ALL.len()] = {
                    let all = <$inner>::ALL;
                    let mut out = [$arg(all[0]); <$inner>::ALL.len()];
                    let mut i = 1;
                    while i < all.len() {
                        out[i] = $arg(all[i]);
                        i += 1;
                    }
                    out
                };
                &ALL
            }

            fn to_possible_value(&self) -> Option<PossibleValue> {
                let $v = self.0;
                Some($value)
            }
        }
    };
}

library_value_enum!(
    /// An expert class: `sequential`, `grouped` or `te_grouped` (Megatron's class names,
    /// `SequentialMLP`, `GroupedMLP`, `TEGroupedMLP`, are accepted too).
    ClassArg(LayerClass),
    |c| PossibleValue::new(c.name()).alias(c.megatron_name()).help(c.megatron_name())
);

library_value_enum!(
    /// A property of the differential harness (spec §10): `matches-oracle`,
    /// `parallel-decomposition`, `class-equivalence`, `zero-tokens`, `padding-neutrality`,
    /// `deferred-wgrad` or `probs-linearity`.
    PropertyArg(Property),
    |p| PossibleValue::new(p.name())
);

library_value_enum!(
    /// A model shape of the registry (`moe_harness::shapes`): `mixtral`, `deepseek-v3`,
    /// `qwen3-30b-a3b` or `gpt-oss-120b`.
    ShapeArg(ModelShape),
    |s| {
        let d = s.dims();
        PossibleValue::new(s.name()).help(format!("h {}, f {}, {} experts, {} rows", d.hidden, d.ffn, d.experts, d.tokens))
    }
);

library_value_enum!(
    /// TransformerEngine's fp8 format: `e4m3` (everything E4M3) or `hybrid` (E5M2 gradients).
    FormatArg(TeFormat),
    |f| PossibleValue::new(f.name())
);

/// `--fp8-recipe`: `none` or one of TransformerEngine's recipes (`Fp8Recipe::ALL`, by Megatron's
/// `--fp8-recipe` names, TE's class names accepted too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecipeArg(pub Option<Fp8Recipe>);

impl clap::ValueEnum for RecipeArg {
    fn value_variants<'a>() -> &'a [Self] {
        const ALL: [RecipeArg; Fp8Recipe::ALL.len() + 1] = {
            let mut out = [RecipeArg(None); Fp8Recipe::ALL.len() + 1];
            let mut i = 0;
            while i < Fp8Recipe::ALL.len() {
                out[i + 1] = RecipeArg(Some(Fp8Recipe::ALL[i]));
                i += 1;
            }
            out
        };
        &ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self.0 {
            None => PossibleValue::new("none").help("no fp8 case"),
            Some(r) => PossibleValue::new(r.name()).alias(r.te_class()).help(r.te_class()),
        })
    }
}

library_value_enum!(
    /// A Hugging Face model family: `mixtral`, `qwen3-moe`, `deepseek-v3` or `gpt-oss`.
    FamilyArg(moe_checkpoint::hf::Family),
    |f| PossibleValue::new(f.name())
);

#[cfg(feature = "cuda")]
library_value_enum!(
    /// A mode of the layer bench: `fwd` or `fwdbwd`.
    ModeArg(moe_bench::layer::Mode),
    |m| PossibleValue::new(m.name())
);

#[cfg(feature = "cuda")]
library_value_enum!(
    /// A GEMM set of the grouped-GEMM bench: `fc1_te`, ..., `fwdbwd_grp`.
    CaseArg(moe_bench::grouped::GroupedCase),
    |c| PossibleValue::new(c.name())
);

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn every_library_value_is_accepted_under_its_name() {
        for c in LayerClass::ALL {
            assert_eq!(ClassArg::from_str(c.name(), false).unwrap(), ClassArg(c));
            assert_eq!(ClassArg::from_str(c.megatron_name(), false).unwrap(), ClassArg(c));
        }
        for p in Property::ALL {
            assert_eq!(PropertyArg::from_str(p.name(), false).unwrap(), PropertyArg(p));
        }
        for s in ModelShape::ALL {
            assert_eq!(ShapeArg::from_str(s.name(), false).unwrap(), ShapeArg(s));
        }
        assert_eq!(ClassArg::value_variants().len(), LayerClass::ALL.len());
        assert_eq!(ShapeArg::value_variants().len(), ModelShape::ALL.len());
        assert_eq!(PropertyArg::value_variants().len(), Property::ALL.len());
        assert!(ClassArg::from_str("mixtral", false).is_err());
        for r in Fp8Recipe::ALL {
            assert_eq!(RecipeArg::from_str(r.name(), false).unwrap(), RecipeArg(Some(r)));
            assert_eq!(RecipeArg::from_str(r.te_class(), false).unwrap(), RecipeArg(Some(r)));
        }
        assert_eq!(RecipeArg::from_str("none", false).unwrap(), RecipeArg(None));
        assert_eq!(RecipeArg::value_variants().len(), Fp8Recipe::ALL.len() + 1);
        assert!(RecipeArg::from_str("nvfp4", false).is_err());
        for f in TeFormat::ALL {
            assert_eq!(FormatArg::from_str(f.name(), false).unwrap(), FormatArg(f));
        }
        assert!(FormatArg::from_str("e5m2", false).is_err());
    }
}
