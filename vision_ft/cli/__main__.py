from vision_ft.cli import main

main()
