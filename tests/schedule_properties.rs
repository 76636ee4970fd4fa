//! Properties every schedule must have, over random beta ranges, T, step counts and spacings.

use proptest::prelude::*;
use sdfix::schedule::{BetaSchedule, BetaSource, NoiseSchedule, Schedule, ScheduleSpec, TimestepSpacing};

fn beta_source() -> impl Strategy<Value = BetaSource> {
    (
        prop_oneof![
            Just(BetaSchedule::Linear),
            Just(BetaSchedule::ScaledLinear),
            Just(BetaSchedule::SquaredCosCapV2)
        ],
        1e-5f64..1e-2,
        1.01f64..20.0,
        2usize..2000,
    )
        .prop_map(|(schedule, beta_start, ratio, train_timesteps)| BetaSource::Named {
            schedule,
            beta_start,
            beta_end: (beta_start * ratio).min(0.05),
            train_timesteps,
        })
}

fn spacing() -> impl Strategy<Value = TimestepSpacing> {
    prop_oneof![
        Just(TimestepSpacing::Leading),
        Just(TimestepSpacing::Linspace),
        Just(TimestepSpacing::Trailing)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn alpha_bar_decreases(source in beta_source(), zero_snr in any::<bool>()) {
        let noise = NoiseSchedule::new(&source, zero_snr).unwrap();
        prop_assert!(noise.alphas_cumprod[0] < 1.0);
        for w in noise.alphas_cumprod.windows(2) {
            prop_assert!(w[1] < w[0], "{} then {}", w[0], w[1]);
        }
    }

    #[test]
    fn rescale_zeroes_terminal_and_keeps_first(source in beta_source()) {
        let stock = NoiseSchedule::new(&source, false).unwrap();
        let rescaled = NoiseSchedule::new(&source, true).unwrap();
        prop_assert_eq!(*rescaled.alphas_cumprod.last().unwrap(), 0.0);
        prop_assert_eq!(rescaled.terminal_snr(), 0.0);
        let (a, b) = (stock.alphas_cumprod[0], rescaled.alphas_cumprod[0]);
        prop_assert!((a - b).abs() <= 1e-12 * a, "alpha_bar_0 {} became {}", a, b);
    }

    #[test]
    fn timesteps_are_n_strictly_decreasing_in_range(
        source in beta_source(),
        spacing in spacing(),
        steps_fraction in 0.0f64..1.0,
        steps_offset in 0usize..2,
        set_alpha_to_one in any::<bool>(),
    ) {
        let train_timesteps = source.train_timesteps();
        let steps = 1 + ((train_timesteps - 1) as f64 * steps_fraction) as usize;
        let spec = ScheduleSpec { betas: source, zero_terminal_snr: true, spacing, steps, steps_offset, set_alpha_to_one };
        let leading_first = (steps - 1) * (train_timesteps / steps) + steps_offset;
        let schedule = match Schedule::new(&spec) {
            Ok(schedule) => schedule,
            Err(_) => {
                // The only refusal: an offset that pushes leading past T - 1.
                prop_assert!(spacing == TimestepSpacing::Leading && leading_first >= train_timesteps);
                return Ok(());
            }
        };
        let t = &schedule.timesteps;
        prop_assert_eq!(t.len(), steps);
        prop_assert!(t[0] < train_timesteps);
        for w in t.windows(2) {
            prop_assert!(w[1] < w[0], "{:?}", t);
        }
        match spacing {
            TimestepSpacing::Trailing => prop_assert_eq!(t[0], train_timesteps - 1),
            // numpy's linspace(0, T - 1, 1) is [0]: one linspace step samples t = 0, as in diffusers.
            TimestepSpacing::Linspace if steps == 1 => prop_assert_eq!(t[0], 0),
            TimestepSpacing::Linspace => prop_assert_eq!(t[0], train_timesteps - 1),
            TimestepSpacing::Leading => prop_assert_eq!(t[0], leading_first),
        }
        let expected_final = if set_alpha_to_one { 1.0 } else { schedule.noise.alphas_cumprod[0] };
        prop_assert_eq!(schedule.prev_alpha_cumprod(steps - 1), expected_final);
    }
}
