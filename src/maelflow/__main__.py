from maelflow.cli.main import main

main()
