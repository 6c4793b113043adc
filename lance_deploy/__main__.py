from lance_deploy.cli import main

main()
