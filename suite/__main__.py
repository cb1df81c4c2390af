from suite.app import main

main()
