"""Looking at models before merging them: task-vector statistics streamed like a merge, a compatibility
verdict (also run, on sampled rows, before every merge), data-free suggestions and the reports.

``geometry`` the statistics of one tensor (pure math) · ``worker`` one tensor task in a worker ·
``summary`` per-tensor sums -> per-layer and per-model figures · ``verdict`` the compatibility rules ·
``assemble`` the report from the sums · ``suggest`` weights, densities and methods · ``text`` / ``html`` the
terminal table and the HTML report · ``inspect_models`` the command's flow · ``merge_check`` the cheap check
before a merge · ``options`` the flags.
"""
