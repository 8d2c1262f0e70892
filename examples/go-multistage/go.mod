module example.com/kiln/go-multistage

go 1.19
