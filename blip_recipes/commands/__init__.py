"""The ``blip`` subcommands beyond run / validate / ls / cp: one module per command, each with
``main(argv, prog=None) -> int`` and its own argparse ``--help``. ``tools/*.py`` are thin wrappers
around these modules, so they keep working from a source checkout.

- ``blip caption``                    :mod:`blip_recipes.commands.caption`
- ``blip convert``                    :mod:`blip_recipes.commands.convert_checkpoint`
- ``blip data synthetic``             :mod:`blip_recipes.commands.make_synthetic_dataset`
- ``blip data build-shards``          :mod:`blip_recipes.commands.build_shards`
- ``blip data init``                  :mod:`blip_recipes.commands.data_init`
- ``blip benchmark [step]``           :mod:`blip_recipes.commands.benchmark`
- ``blip benchmark data``             :mod:`blip_recipes.commands.benchmark_data`
- ``blip benchmark float8-layers``    :mod:`blip_recipes.commands.benchmark_float8_layers`
- ``blip benchmark flops``            :mod:`blip_recipes.commands.count_flops`
"""
