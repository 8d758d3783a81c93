from raytumor.cli import main

main()
