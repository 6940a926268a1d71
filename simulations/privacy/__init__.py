"""Privacy evaluation of a scenario: what leaks, measured by attacks, and what protection costs.

`run.run_privacy_eval` is the entry point (`fedshop privacy`); `in_process_grid.InProcessGrid` is the
Flower Grid the attacks and the SecAgg+/DP tests run shops on, in this process.
"""
