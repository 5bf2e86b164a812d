set terminal pngcairo size 900,560 font ',11'
set grid ytics
set key outside right top
set output 'memory.png'
set title 'Total memory per idle session (beam RSS + sidecar RSS + kernel), lower is better'
set xlabel 'idle sessions (N)'
set ylabel 'KiB per session'
set autoscale y
plot 'memory.dat' index 0 using 1:2 with linespoints lw 2 dt 2 lc 1 title 'TCP c2s native', \
     'memory.dat' index 1 using 1:2 with linespoints lw 2 dt 1 lc 1 title 'TCP c2s Megaphone', \
     'memory.dat' index 2 using 1:2 with linespoints lw 2 dt 2 lc 2 title 'TLS c2s native', \
     'memory.dat' index 3 using 1:2 with linespoints lw 2 dt 1 lc 2 title 'TLS c2s Megaphone', \
     'memory.dat' index 4 using 1:2 with linespoints lw 2 dt 2 lc 3 title 'WebSocket native', \
     'memory.dat' index 5 using 1:2 with linespoints lw 2 dt 1 lc 3 title 'WebSocket Megaphone', \
     'memory.dat' index 6 using 1:2 with linespoints lw 2 dt 2 lc 4 title 'BOSH native', \
     'memory.dat' index 7 using 1:2 with linespoints lw 2 dt 1 lc 4 title 'BOSH Megaphone', \
     'memory.dat' index 8 using 1:2 with linespoints lw 2 dt 2 lc 5 title 'BOSH (edge) native', \
     'memory.dat' index 9 using 1:2 with linespoints lw 2 dt 1 lc 5 title 'BOSH (edge) Megaphone'
set output 'memory-split.png'
set title 'Where an idle session''s memory goes, at the largest N'
set xlabel ''
set style data histograms
set style histogram rowstacked
set style fill solid 0.8 border -1
set boxwidth 0.7
set xtics rotate by -30 font ',9'
plot 'memory-split.dat' using 2:xtic(1) title 'beam RSS', '' using 3 title 'sidecar RSS', '' using 4 title 'kernel'
set output 'throughput.png'
set title '1:1 chat throughput, one message in flight per pair, higher is better'
set ylabel 'messages/s'
set style histogram clustered gap 1
set xtics norotate font ',11'
plot 'chat.dat' using 2:xtic(1) title 'native', '' using 3 title 'Megaphone'
set output 'latency.png'
set title '1:1 chat latency at a paced rate (send to delivery), lower is better'
set ylabel 'ms'
plot 'chat.dat' using 4:xtic(1) title 'native p50', '' using 6 title 'Megaphone p50', '' using 5 title 'native p99', '' using 7 title 'Megaphone p99'
