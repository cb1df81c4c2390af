from suite.launch.cli import main

main()
