from vision_ft.entry import main

main()
