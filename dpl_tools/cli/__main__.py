from dpl_tools.cli.cli import main

main()
